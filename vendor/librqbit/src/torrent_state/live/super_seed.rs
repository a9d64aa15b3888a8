//! luna patch: super-seeding (BEP 16), the bookkeeping without IO.
//!
//! A super-seeding torrent sends no bitfield: it tells each peer of one or two pieces at a time
//! with HAVE messages, and the pieces it tells of are those it has given out least, near the
//! peer's first missing piece. So the first copy of every piece goes to some peer before any
//! piece goes out twice, and the peers trade the rest among themselves. Without it, the server's
//! few upload-slot holders each fetched the whole image from it (nodes stream the image in
//! order, so they all want the same pieces): about two copies left the server before the last
//! piece reached the swarm (bench-swarm, 64 nodes, 10 Mbit/s).
//!
//! `TorrentStateLive::task_super_seed` calls [`SuperSeed::offer`] for every live peer on each
//! tick and sends the HAVEs it returns; `on_download_request` calls [`SuperSeed::on_request`].
//! Every request is served as before, offered or not.
//!
//! An offer is done once the peer has asked for every chunk of the piece: a peer never tells us
//! (HAVE) of a piece it knows we have, so BEP 16's "seen at another peer" cannot be used here.
//! A piece we told a peer of is not offered to it again: it may ask for it any time.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Pieces a peer has been told of and not yet asked for whole, at most. Two, so that it asks
/// for the next while the last chunks of one are on the way.
pub(crate) const OFFERS_PER_PEER: usize = 2;
/// An offer is chosen among the peer's first this many missing pieces (luna-agent fetches
/// only a window of pieces ahead of its reader, and picks among the first `piece_spread` of
/// them).
pub(crate) const OFFER_AHEAD: usize = 8;
/// An offer the peer has not asked a chunk of within this is given up: the peer does not want
/// that piece (yet) or got it elsewhere, and another is offered instead.
pub(crate) const OFFER_UNASKED: Duration = Duration::from_secs(2);
/// An offer the peer began but did not ask for whole within this is given up too.
pub(crate) const OFFER_UNFINISHED: Duration = Duration::from_secs(30);

struct Offer {
    piece: u32,
    at: Instant,
    /// Chunks of the piece the peer asked for.
    asked: HashSet<u32>,
}

#[derive(Default)]
struct PeerOffers {
    offers: Vec<Offer>,
    /// Every piece the peer was told of.
    told: HashSet<u32>,
}

pub(crate) struct SuperSeed {
    /// Per piece: to how many peers it went (or is going) from us.
    given: Vec<u32>,
    peers: HashMap<SocketAddr, PeerOffers>,
}

impl SuperSeed {
    pub(crate) fn new(pieces: usize) -> Self {
        Self {
            given: vec![0; pieces],
            peers: HashMap::new(),
        }
    }

    /// How many peers each piece went to from us.
    #[cfg(test)]
    pub(crate) fn given(&self) -> &[u32] {
        &self.given
    }

    fn ungive(given: &mut [u32], piece: u32) {
        if let Some(g) = given.get_mut(piece as usize) {
            *g = g.saturating_sub(1);
        }
    }

    /// `peer` asked us for chunk `chunk` of the `chunks` of `piece`.
    pub(crate) fn on_request(&mut self, peer: SocketAddr, piece: u32, chunk: u32, chunks: u32) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let Some(at) = p.offers.iter().position(|o| o.piece == piece) else {
            return;
        };
        p.offers[at].asked.insert(chunk);
        if p.offers[at].asked.len() >= chunks as usize {
            p.offers.swap_remove(at);
        }
    }

    /// One round for a live peer that has the pieces for which `has` is true: gives up stale
    /// offers and returns the pieces to tell it of now.
    pub(crate) fn offer(&mut self, peer: SocketAddr, has: impl Fn(usize) -> bool, now: Instant) -> Vec<u32> {
        let mut p = self.peers.remove(&peer).unwrap_or_default();
        let given = &mut self.given;
        p.offers.retain(|o| {
            let age = now.saturating_duration_since(o.at);
            let stale = if o.asked.is_empty() {
                age >= OFFER_UNASKED
            } else {
                age >= OFFER_UNFINISHED
            };
            if stale || has(o.piece as usize) {
                Self::ungive(given, o.piece);
            }
            !stale && !has(o.piece as usize)
        });
        let mut out = Vec::new();
        while p.offers.len() < OFFERS_PER_PEER {
            let pick = (0..given.len())
                .filter(|i| !has(*i) && !p.told.contains(&(*i as u32)))
                .take(OFFER_AHEAD)
                .min_by_key(|i| (given[*i], *i));
            let Some(i) = pick else { break };
            given[i] += 1;
            p.told.insert(i as u32);
            p.offers.push(Offer {
                piece: i as u32,
                at: now,
                asked: HashSet::new(),
            });
            out.push(i as u32);
        }
        self.peers.insert(peer, p);
        out
    }

    /// Forgets the peers that are not live any more; what they were offered and did not ask
    /// for whole counts as not given.
    pub(crate) fn retain(&mut self, live: impl Fn(&SocketAddr) -> bool) {
        let gone: Vec<SocketAddr> = self.peers.keys().filter(|a| !live(a)).copied().collect();
        for a in gone {
            if let Some(p) = self.peers.remove(&a) {
                for o in p.offers {
                    Self::ungive(&mut self.given, o.piece);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 6881))
    }

    /// The peer asks for the whole piece, in `chunks` chunks.
    fn fetch(s: &mut SuperSeed, peer: u8, piece: u32, chunks: u32) {
        for c in 0..chunks {
            s.on_request(addr(peer), piece, c, chunks);
        }
    }

    #[test]
    fn two_peers_get_different_pieces_first() {
        let mut s = SuperSeed::new(8);
        let now = Instant::now();
        assert_eq!(s.offer(addr(1), |_| false, now), vec![0, 1]);
        assert_eq!(s.offer(addr(2), |_| false, now), vec![2, 3]);
        // Half of piece 0 asked for: nothing new yet.
        s.on_request(addr(1), 0, 0, 2);
        assert!(s.offer(addr(1), |_| false, now).is_empty());
        // All of it: the next piece nobody got.
        s.on_request(addr(1), 0, 1, 2);
        assert_eq!(s.offer(addr(1), |_| false, now), vec![4]);
        assert_eq!(s.given(), &[1, 1, 1, 1, 1, 0, 0, 0]);
    }

    #[test]
    fn a_piece_not_asked_for_is_given_up() {
        let mut s = SuperSeed::new(4);
        let now = Instant::now();
        assert_eq!(s.offer(addr(1), |_| false, now), vec![0, 1]);
        s.on_request(addr(1), 1, 0, 2);
        let later = now + OFFER_UNASKED;
        // 0 was never asked for (the peer got it elsewhere, or does not want it yet): given
        // up, and not told of again; 1 is on its way.
        assert_eq!(s.offer(addr(1), |_| false, later), vec![2]);
        assert_eq!(s.given(), &[0, 1, 1, 0]);
        // Another peer gets 0 first now.
        assert_eq!(s.offer(addr(2), |_| false, later), vec![0, 3]);
    }

    #[test]
    fn a_piece_the_peer_announces_is_not_counted() {
        let mut s = SuperSeed::new(4);
        let now = Instant::now();
        assert_eq!(s.offer(addr(1), |_| false, now), vec![0, 1]);
        // It told us it has 1 (got elsewhere) before asking us for any of it.
        assert_eq!(s.offer(addr(1), |i| i == 1, now), vec![2]);
        assert_eq!(s.given(), &[1, 0, 1, 0]);
    }

    #[test]
    fn a_gone_peer_gives_back_what_it_did_not_get() {
        let mut s = SuperSeed::new(4);
        let now = Instant::now();
        s.offer(addr(1), |_| false, now);
        fetch(&mut s, 1, 0, 4);
        s.offer(addr(2), |_| false, now);
        s.retain(|a| *a == addr(2));
        // Peer 1 asked for piece 0 whole and had 1 on offer; peer 2 has 2 and 3 on offer.
        assert_eq!(s.given(), &[1, 0, 1, 1]);
    }

    #[test]
    fn once_all_went_out_the_least_given_goes_again() {
        let mut s = SuperSeed::new(3);
        let now = Instant::now();
        assert_eq!(s.offer(addr(1), |_| false, now), vec![0, 1]);
        // 2 has not gone out yet, then the lowest of those that went out once.
        assert_eq!(s.offer(addr(2), |_| false, now), vec![2, 0]);
        assert_eq!(s.offer(addr(3), |_| false, now), vec![1, 2]);
        assert_eq!(s.given(), &[2, 2, 2]);
        // A complete peer is offered nothing.
        assert!(s.offer(addr(4), |_| true, now).is_empty());
        // Nor one told of every piece it lacks.
        fetch(&mut s, 1, 0, 1);
        fetch(&mut s, 1, 1, 1);
        assert_eq!(s.offer(addr(1), |_| false, now), vec![2]);
        fetch(&mut s, 1, 2, 1);
        assert!(s.offer(addr(1), |_| false, now).is_empty());
    }
}
