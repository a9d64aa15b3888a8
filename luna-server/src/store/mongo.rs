//! The MongoDB store (production, HA). Being written: see the MongoDB backend work item.

use super::{Collection, Record, Result, Store, StoreError, Write};

pub struct MongoStore;

impl MongoStore {
    pub async fn open(url: &str) -> Result<Self> {
        Err(StoreError::BadUrl(url.to_string()))
    }
}

#[async_trait::async_trait]
impl Store for MongoStore {
    fn backend(&self) -> &'static str {
        "mongodb"
    }
    async fn get(&self, _: Collection, _: &str) -> Result<Option<Record>> {
        unreachable!("never constructed")
    }
    async fn list(&self, _: Collection, _: &str) -> Result<Vec<Record>> {
        unreachable!("never constructed")
    }
    async fn commit(&self, _: Vec<Write>) -> Result<()> {
        unreachable!("never constructed")
    }
}
