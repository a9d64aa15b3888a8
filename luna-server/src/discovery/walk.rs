//! A GETBULK walk of one subtree, sans-IO: which OID to ask for next, and what an answer adds.

use super::snmp::{Oid, Value};

/// Rows one walk may return before it is called garbage (a 48-port switch has a few hundred).
pub const MAX_ROWS: usize = 200_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    #[error("agent returned {got} after {prev} while walking {root}: oids must increase")]
    NotIncreasing { root: Oid, prev: Oid, got: Oid },
    #[error("walk of {root} returned more than {MAX_ROWS} rows")]
    TooManyRows { root: Oid },
}

/// The state of one subtree walk.
#[derive(Debug, Clone)]
pub struct Walk {
    root: Oid,
    last: Oid,
    rows: Vec<(Oid, Value)>,
    done: bool,
}

impl Walk {
    pub fn new(root: Oid) -> Self {
        Walk { last: root.clone(), root, rows: Vec::new(), done: false }
    }

    pub fn root(&self) -> &Oid {
        &self.root
    }

    /// The OID to put in the next GETBULK, or `None` when the subtree has been read.
    pub fn next_oid(&self) -> Option<&Oid> {
        (!self.done).then_some(&self.last)
    }

    /// Takes the varbinds of one response. Rows past the subtree or `endOfMibView` end the walk;
    /// an empty response ends it too (nothing after the last OID).
    pub fn feed(&mut self, varbinds: Vec<(Oid, Value)>) -> Result<(), WalkError> {
        if varbinds.is_empty() {
            self.done = true;
        }
        for (oid, value) in varbinds {
            if self.done {
                break;
            }
            if matches!(value, Value::EndOfMibView) || !oid.starts_with(&self.root) || oid == self.root {
                self.done = true;
                break;
            }
            if oid <= self.last {
                return Err(WalkError::NotIncreasing { root: self.root.clone(), prev: self.last.clone(), got: oid });
            }
            if matches!(value, Value::NoSuchObject | Value::NoSuchInstance) {
                self.last = oid;
                continue;
            }
            if self.rows.len() >= MAX_ROWS {
                return Err(WalkError::TooManyRows { root: self.root.clone() });
            }
            self.last = oid.clone();
            self.rows.push((oid, value));
        }
        Ok(())
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The rows, as (index below the root, value).
    pub fn into_rows(self) -> Vec<(Vec<u32>, Value)> {
        let root = self.root;
        self.rows.into_iter().map(|(o, v)| (o.suffix(&root).to_vec(), v)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oid(s: &str) -> Oid {
        s.parse().unwrap()
    }

    #[test]
    fn walks_until_the_subtree_ends() {
        let mut w = Walk::new(oid("1.3.6.1.2.1.17.1.4.1.2"));
        assert_eq!(w.next_oid(), Some(&oid("1.3.6.1.2.1.17.1.4.1.2")));
        w.feed(vec![
            (oid("1.3.6.1.2.1.17.1.4.1.2.1"), Value::Integer(1001)),
            (oid("1.3.6.1.2.1.17.1.4.1.2.2"), Value::Integer(1002)),
        ])
        .unwrap();
        assert_eq!(w.next_oid(), Some(&oid("1.3.6.1.2.1.17.1.4.1.2.2")));
        w.feed(vec![
            (oid("1.3.6.1.2.1.17.1.4.1.2.7"), Value::Integer(1007)),
            (oid("1.3.6.1.2.1.17.4.3.1.1.0"), Value::Integer(0)),
            (oid("1.3.6.1.2.1.17.4.3.1.1.1"), Value::Integer(0)),
        ])
        .unwrap();
        assert!(w.is_done());
        assert_eq!(w.next_oid(), None);
        assert_eq!(
            w.into_rows(),
            vec![(vec![1], Value::Integer(1001)), (vec![2], Value::Integer(1002)), (vec![7], Value::Integer(1007))]
        );
    }

    #[test]
    fn end_of_mib_and_empty_answers_end_the_walk() {
        let mut w = Walk::new(oid("1.3.6.1.2.1.31.1.1.1.1"));
        w.feed(vec![(oid("1.3.6.1.2.1.31.1.1.1.1.5"), Value::EndOfMibView)]).unwrap();
        assert!(w.is_done() && w.into_rows().is_empty());
        let mut w = Walk::new(oid("1.3.6.1.2.1.31.1.1.1.1"));
        w.feed(vec![]).unwrap();
        assert!(w.is_done());
    }

    #[test]
    fn a_looping_agent_is_an_error() {
        let mut w = Walk::new(oid("1.3.6.1.2.1.17.1.4.1.2"));
        w.feed(vec![(oid("1.3.6.1.2.1.17.1.4.1.2.5"), Value::Integer(1))]).unwrap();
        let e = w.feed(vec![(oid("1.3.6.1.2.1.17.1.4.1.2.5"), Value::Integer(1))]).unwrap_err();
        assert!(e.to_string().contains("must increase"), "{e}");
    }
}
