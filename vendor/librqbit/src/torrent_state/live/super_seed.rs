//! luna patch: super-seeding (BEP 16), the bookkeeping without IO.
//!
//! A super-seeding torrent sends no bitfield: it tells each peer of one piece at a time (a peer
//! slow to ask, of up to `OFFER_BUDGET_BYTES`) with HAVE messages: among the peer's missing pieces within `OFFER_AHEAD_BYTES` of its first
//! missing one, one that no connected peer got from us yet, else the first. So the first copy
//! of every piece goes to some peer early, and the peers trade the rest among themselves; a peer
//! that comes late, when every piece has gone out, is told of its pieces in order and can stream
//! them (choosing the least-given there starved such a peer's first missing piece: e2e's lone
//! node005 got nothing it could unpack until the end).
//! Without it, the server's few upload-slot holders each fetched the whole image from it (nodes
//! stream the image in order, so they all want the same pieces): about two copies left the
//! server before the last piece reached the swarm (bench-swarm, 64 nodes, 10 Mbit/s).
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

/// Pieces a peer has on offer (told of, not yet asked for whole): one, and for a peer that is
/// slow to ask (`SLOW_ASK`) as many as fit in this many bytes. The next is told the moment
/// the peer has asked for the last chunk of an offer (`on_request` wakes the offers), while
/// those chunks are still on their way, so a peer that asks at once (luna-agent, woken by the
/// HAVE) keeps its link to us busy with one. More than one for every peer lets a slot holder's
/// pieces come side by side, each at a fraction of the slot, so each first copy reaches the
/// swarm later: with 256 KiB pieces and two a peer (their clock then ran from when they were
/// told), 2.96 copies left the server and T was 3.28 S/B, against 1.1 and 2.45 with one
/// (bench-swarm, N = 64, 8 MiB at 5 Mbit/s); with 64 KiB pieces (32 MiB, one machine, session
/// 15): four for every peer 1.55 and 1.63 S/B, one 1.56 and 1.57, this rule 1.54 and 1.54.
/// But a peer that asks on a timer of its own (transmission, about once a second) got one
/// piece a round from one offer: 64 KiB/s with 64 KiB pieces, and `swarm_clients` timed out at
/// 71 %.
pub(crate) const OFFER_BUDGET_BYTES: u64 = 256 << 10;
/// A peer that asks for the first chunk of an offer told as a refill (at most `REFILL` after
/// it asked for the last chunk of one before) this long or more after the HAVE is slow to ask,
/// and gets `OFFER_BUDGET_BYTES` on offer. luna-agent asks within one chunk's time on its link
/// to us (a 16 KiB chunk through one of 8 slots of 5 Mbit/s: 0.2 s); transmission after about
/// a second.
pub(crate) const SLOW_ASK: Duration = Duration::from_millis(500);
/// How soon after a peer asked for the last chunk of an offer a new one counts as its refill.
pub(crate) const REFILL: Duration = Duration::from_millis(150);
/// An offer is chosen among the peer's missing pieces that begin within this many bytes of its
/// first missing one: luna-agent keeps a window of 24 MiB ahead of its reader and asks for
/// nothing beyond it. Eight pieces (the first cut) made a seeder with 8 slots hand the same
/// pieces to half of them at once (bench-swarm, 8 nodes: 3.9 copies left the server).
pub(crate) const OFFER_AHEAD_BYTES: u64 = 16 << 20;
/// An offer the peer has not asked a chunk of within this is given up: the peer does not want
/// that piece (yet) or got it elsewhere, and another is offered instead. The clock runs from
/// when it was told or from the peer's last request to us, whichever is later: a peer still
/// fetching the offers before it (its request window full of them) is not refusing it.
pub(crate) const OFFER_UNASKED: Duration = Duration::from_secs(2);
/// An offer the peer did not ask for whole within this of being told is given up too, asked
/// for in part or not at all.
pub(crate) const OFFER_UNFINISHED: Duration = Duration::from_secs(30);

struct Offer {
    piece: u32,
    at: Instant,
    /// Told as a refill (`REFILL`): how soon it is asked for tells a slow asker.
    refill: bool,
    /// Chunks of the piece the peer asked for.
    asked: HashSet<u32>,
}

#[derive(Default)]
struct PeerOffers {
    offers: Vec<Offer>,
    /// Every piece the peer was told of.
    told: HashSet<u32>,
    /// The offers it asked for whole: counted in `given` while it is connected.
    got: Vec<u32>,
    /// When it last asked us for a chunk, of any piece.
    last_ask: Option<Instant>,
    /// When it last asked for the last chunk of an offer.
    last_done: Option<Instant>,
    /// It asked for its last refill offer `SLOW_ASK` or more after the HAVE.
    slow: bool,
}

pub(crate) struct SuperSeed {
    /// Per piece: to how many of the connected peers it went (or is going) from us. A peer that
    /// leaves takes its copies along: counted for good, a second wave of nodes booting found
    /// every piece given and got them all in the same order (bench-swarm, the second run of
    /// an invocation: 2.5 copies from the server against 1.5 in the first).
    given: Vec<u32>,
    peers: HashMap<SocketAddr, PeerOffers>,
    /// How many pieces from a peer's first missing one an offer may be (`OFFER_AHEAD_BYTES`).
    ahead: usize,
    /// How many offers a slow asker may have at once (`OFFER_BUDGET_BYTES`).
    budget: usize,
}

impl SuperSeed {
    pub(crate) fn new(pieces: usize, piece_length: u64) -> Self {
        Self {
            given: vec![0; pieces],
            peers: HashMap::new(),
            ahead: (OFFER_AHEAD_BYTES / piece_length.max(1)).max(1) as usize,
            budget: (OFFER_BUDGET_BYTES / piece_length.max(1)).max(1) as usize,
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

    /// `peer` asked us for chunk `chunk` of the `chunks` of `piece`, at `now`. True when that
    /// was the last chunk of an offer: the peer has room for the next one.
    pub(crate) fn on_request(&mut self, peer: SocketAddr, piece: u32, chunk: u32, chunks: u32, now: Instant) -> bool {
        let Some(p) = self.peers.get_mut(&peer) else {
            return false;
        };
        p.last_ask = Some(now);
        let Some(at) = p.offers.iter().position(|o| o.piece == piece) else {
            return false;
        };
        let o = &mut p.offers[at];
        if o.asked.is_empty() && o.refill {
            p.slow = now.saturating_duration_since(o.at) >= SLOW_ASK;
        }
        o.asked.insert(chunk);
        if o.asked.len() >= chunks as usize {
            p.offers.remove(at);
            p.got.push(piece);
            p.last_done = Some(now);
            return true;
        }
        false
    }

    /// One round for a live peer that has the pieces for which `has` is true: gives up stale
    /// offers and returns the pieces to tell it of now.
    pub(crate) fn offer(&mut self, peer: SocketAddr, has: impl Fn(usize) -> bool, now: Instant) -> Vec<u32> {
        let mut p = self.peers.remove(&peer).unwrap_or_default();
        let (given, ahead) = (&mut self.given, self.ahead);
        let last_ask = p.last_ask;
        p.offers.retain(|o| {
            let since = last_ask.map_or(o.at, |a| a.max(o.at));
            let stale = now.saturating_duration_since(o.at) >= OFFER_UNFINISHED
                || (o.asked.is_empty() && now.saturating_duration_since(since) >= OFFER_UNASKED);
            if stale || has(o.piece as usize) {
                Self::ungive(given, o.piece);
            }
            !stale && !has(o.piece as usize)
        });
        let mut out = Vec::new();
        let room = if p.slow { self.budget } else { 1 };
        while p.offers.len() < room {
            // The peer's first missing piece, as far as we can know. It never tells us of a
            // piece we told it of, so those count as had once they are no longer on offer
            // (asked for whole, or given up: then it got it elsewhere or may ask any time).
            // Counted as missing, the first piece it got from us pinned the offer span there
            // for good; once every piece in the span was told, nothing more was offered and the
            // whole swarm stalled on the first piece past it (bench-swarm, 8 and 64 nodes, 128
            // pieces of 256 KiB: every node stalled at piece 76-79 and fell back to HTTP).
            let known = |i: usize| {
                has(i) || (p.told.contains(&(i as u32)) && !p.offers.iter().any(|o| o.piece as usize == i))
            };
            let Some(first) = (0..given.len()).find(|i| !known(*i)) else { break };
            let pick = (first..given.len().min(first + ahead))
                .filter(|i| !has(*i) && !p.told.contains(&(*i as u32)))
                .min_by_key(|i| (given[*i] > 0, *i));
            let Some(i) = pick else { break };
            given[i] += 1;
            p.told.insert(i as u32);
            let refill = p.last_done.is_some_and(|d| now.saturating_duration_since(d) <= REFILL);
            p.offers.push(Offer {
                piece: i as u32,
                at: now,
                refill,
                asked: HashSet::new(),
            });
            out.push(i as u32);
        }
        self.peers.insert(peer, p);
        out
    }

    /// Forgets the peers that are not live any more: what they were offered or got from us
    /// counts as not given.
    pub(crate) fn retain(&mut self, live: impl Fn(&SocketAddr) -> bool) {
        let gone: Vec<SocketAddr> = self.peers.keys().filter(|a| !live(a)).copied().collect();
        for a in gone {
            if let Some(p) = self.peers.remove(&a) {
                for piece in p.offers.iter().map(|o| o.piece).chain(p.got) {
                    Self::ungive(&mut self.given, piece);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2 MiB pieces: offers reach 8 pieces ahead.
    const PIECE: u64 = 2 << 20;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 6881))
    }

    /// The peer asks for the whole piece, in `chunks` chunks.
    fn fetch(s: &mut SuperSeed, peer: u8, piece: u32, chunks: u32) {
        fetch_at(s, peer, piece, chunks, Instant::now());
    }

    /// The peer asks for the whole piece, in `chunks` chunks, at `t`.
    fn fetch_at(s: &mut SuperSeed, peer: u8, piece: u32, chunks: u32, t: Instant) {
        for c in 0..chunks {
            s.on_request(addr(peer), piece, c, chunks, t);
        }
    }

    #[test]
    fn two_peers_get_different_pieces_first() {
        let mut s = SuperSeed::new(8, PIECE);
        let now = Instant::now();
        assert_eq!(s.offer(addr(1), |_| false, now), vec![0]);
        assert_eq!(s.offer(addr(2), |_| false, now), vec![1]);
        // Half of piece 0 asked for: nothing new yet.
        s.on_request(addr(1), 0, 0, 2, now);
        assert!(s.offer(addr(1), |_| false, now).is_empty());
        // All of it: the next piece nobody got.
        assert!(s.on_request(addr(1), 0, 1, 2, now));
        assert_eq!(s.offer(addr(1), |_| false, now), vec![2]);
        assert_eq!(s.given(), &[1, 1, 1, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn one_offer_at_a_time_so_none_goes_stale_while_the_last_one_comes() {
        // A peer fetching its offer slowly (seconds through one of the seeder's slots) is told
        // of nothing more until it has asked for all of it; the pieces not told to it go to
        // other peers, once each. With two offers at a time the second went stale unasked,
        // was offered to another peer as well, and both fetched it (2.96 copies of the image
        // left the server for 64 nodes).
        let mut s = SuperSeed::new(4, PIECE);
        let now = Instant::now();
        assert_eq!(s.offer(addr(1), |_| false, now), vec![0]);
        s.on_request(addr(1), 0, 0, 4, now);
        let slow = now + OFFER_UNASKED * 5;
        assert!(s.offer(addr(1), |_| false, slow).is_empty());
        assert_eq!(s.offer(addr(2), |_| false, slow), vec![1]);
        assert_eq!(s.given(), &[1, 1, 0, 0]);
    }

    #[test]
    fn a_piece_not_asked_for_is_given_up() {
        let mut s = SuperSeed::new(4, PIECE);
        let now = Instant::now();
        assert_eq!(s.offer(addr(1), |_| false, now), vec![0]);
        let later = now + OFFER_UNASKED;
        // 0 was never asked for (the peer got it elsewhere, or does not want it yet): given
        // up, and not told of again.
        assert_eq!(s.offer(addr(1), |_| false, later), vec![1]);
        assert_eq!(s.given(), &[0, 1, 0, 0]);
        // Another peer gets 0 first now.
        assert_eq!(s.offer(addr(2), |_| false, later), vec![0]);
    }

    #[test]
    fn a_piece_the_peer_announces_is_not_counted() {
        let mut s = SuperSeed::new(4, PIECE);
        let now = Instant::now();
        assert_eq!(s.offer(addr(1), |_| false, now), vec![0]);
        // It told us it has 0 (got elsewhere) before asking us for any of it.
        assert_eq!(s.offer(addr(1), |i| i == 0, now), vec![1]);
        assert_eq!(s.given(), &[0, 1, 0, 0]);
    }

    #[test]
    fn a_gone_peer_takes_its_copies_along() {
        let mut s = SuperSeed::new(4, PIECE);
        let now = Instant::now();
        assert_eq!(s.offer(addr(1), |_| false, now), vec![0]);
        fetch(&mut s, 1, 0, 4);
        assert_eq!(s.offer(addr(1), |_| false, now), vec![1]);
        assert_eq!(s.offer(addr(2), |_| false, now), vec![2]);
        s.retain(|a| *a == addr(2));
        // Peer 1 asked for piece 0 whole and had 1 on offer; peer 2 has 2 on offer.
        assert_eq!(s.given(), &[0, 0, 1, 0]);
        // So a peer of the next wave gets what nobody connected has from us.
        assert_eq!(s.offer(addr(3), |_| false, now), vec![0]);
        assert_eq!(s.given(), &[1, 0, 1, 0]);
    }

    #[test]
    fn offers_move_on_past_the_pieces_the_peer_got_from_us() {
        // 256 KiB pieces: offers reach 64 pieces ahead. The peer asks for every offer whole
        // and, as a peer does, never tells us it has them: offers must go on to the end.
        let mut s = SuperSeed::new(200, 256 << 10);
        let now = Instant::now();
        let mut offered = Vec::new();
        for _ in 0..400 {
            let round = s.offer(addr(1), |_| false, now);
            if round.is_empty() {
                break;
            }
            for piece in round {
                fetch(&mut s, 1, piece, 16);
                offered.push(piece);
            }
        }
        offered.sort_unstable();
        assert_eq!(offered, (0..200).collect::<Vec<_>>());
    }

    #[test]
    fn offers_reach_as_far_as_the_nodes_window() {
        // 256 KiB pieces: 64 pieces ahead. Eight peers get eight different pieces, though
        // they all lack the same first one.
        let mut s = SuperSeed::new(200, 256 << 10);
        let now = Instant::now();
        let mut all = HashSet::new();
        for peer in 1..=8 {
            for piece in s.offer(addr(peer), |_| false, now) {
                assert!(all.insert(piece), "piece {piece} offered twice");
            }
        }
        assert_eq!(all, (0..8).collect());
        // A peer that has the first 40 is offered nothing beyond 40 + 64.
        assert_eq!(s.offer(addr(9), |i| i < 40, now), vec![40]);
        s.given[40..104].fill(1);
        s.given[104..].fill(0);
        let later = s.offer(addr(10), |i| i < 40, now);
        assert!(later.iter().all(|p| *p < 104), "{later:?}");
    }

    #[test]
    fn a_late_peer_gets_its_first_missing_pieces() {
        // Pieces 1 and 3 went out less often than 0 and 2, but a peer that streams in order
        // can use nothing until it has 0: handing it 1 and 3 first starved it (e2e's node005,
        // booting alone after the others had gone, got no piece it could unpack until the end).
        let mut s = SuperSeed::new(4, PIECE);
        let now = Instant::now();
        s.given = vec![2, 1, 2, 1];
        assert_eq!(s.offer(addr(9), |_| false, now), vec![0]);
        assert_eq!(s.given(), &[3, 1, 2, 1]);
    }

    #[test]
    fn once_all_went_out_they_go_again_in_order() {
        let mut s = SuperSeed::new(3, PIECE);
        let now = Instant::now();
        assert_eq!(s.offer(addr(1), |_| false, now), vec![0]);
        assert_eq!(s.offer(addr(2), |_| false, now), vec![1]);
        assert_eq!(s.offer(addr(3), |_| false, now), vec![2]);
        // Once every piece went out, in order: the peer can stream what it gets.
        assert_eq!(s.offer(addr(4), |_| false, now), vec![0]);
        assert_eq!(s.given(), &[2, 1, 1]);
        // A complete peer is offered nothing.
        assert!(s.offer(addr(5), |_| true, now).is_empty());
        // Nor one told of every piece it lacks.
        fetch(&mut s, 1, 0, 1);
        assert_eq!(s.offer(addr(1), |_| false, now), vec![1]);
        fetch(&mut s, 1, 1, 1);
        assert_eq!(s.offer(addr(1), |_| false, now), vec![2]);
        fetch(&mut s, 1, 2, 1);
        assert!(s.offer(addr(1), |_| false, now).is_empty());
    }

    /// Peer `peer` is told of a first piece and asks for it whole at `t`; a refill is told
    /// 10 ms later and asked for `ask_after` after that, whole. Returns the two pieces and when
    /// the refill was asked for.
    fn first_two(s: &mut SuperSeed, peer: u8, t: Instant, ask_after: Duration) -> (Vec<u32>, Instant) {
        let mut pieces = s.offer(addr(peer), |_| false, t);
        assert_eq!(pieces.len(), 1, "one offer to begin with");
        fetch_at(s, peer, pieces[0], 4, t);
        let told = t + Duration::from_millis(10);
        let refill = s.offer(addr(peer), |_| false, told);
        assert_eq!(refill.len(), 1, "one refill");
        let asked = told + ask_after;
        fetch_at(s, peer, refill[0], 4, asked);
        pieces.extend(refill);
        (pieces, asked)
    }

    #[test]
    fn a_peer_slow_to_ask_gets_the_budget_on_offer_and_a_quick_one_one_piece() {
        // 64 KiB pieces. A peer asking on a timer of its own (transmission: about once a
        // second) is told of four at once, so it gets 256 KiB a round, not 64 KiB.
        let mut s = SuperSeed::new(32, 64 << 10);
        let t0 = Instant::now();
        let (first, asked) = first_two(&mut s, 1, t0, Duration::from_secs(1));
        assert_eq!(first, vec![0, 1]);
        assert_eq!(s.offer(addr(1), |_| false, asked), vec![2, 3, 4, 5]);
        // luna-agent asks at once: one at a time.
        let (first, asked) = first_two(&mut s, 2, t0, Duration::from_millis(100));
        assert_eq!(first, vec![6, 7]);
        assert_eq!(s.offer(addr(2), |_| false, asked), vec![8]);
        // An offer told long after the last one went whole (a tick, not a refill) tells
        // nothing: a peer choked meanwhile asks for it late through no fault of its own.
        let late = asked + Duration::from_secs(5);
        fetch(&mut s, 2, 8, 4);
        assert_eq!(s.offer(addr(2), |_| false, late), vec![9]);
        fetch_at(&mut s, 2, 9, 4, late + Duration::from_secs(1));
        assert_eq!(s.offer(addr(2), |_| false, late + Duration::from_secs(1)), vec![10]);
        // And a slow asker that turns quick is back to one. (Peer 1 asks for its four a second
        // after the HAVEs, still slow.)
        let t = t0 + Duration::from_secs(3);
        for piece in 2..=5 {
            fetch_at(&mut s, 1, piece, 4, t);
        }
        let t = t + Duration::from_millis(10);
        let refill = s.offer(addr(1), |_| false, t);
        assert_eq!(refill, vec![11, 12, 13, 14]);
        fetch_at(&mut s, 1, 11, 4, t + Duration::from_millis(50));
        assert!(s.offer(addr(1), |_| false, t + Duration::from_millis(50)).is_empty());
    }

    #[test]
    fn queued_offers_wait_while_the_peer_asks_for_the_ones_before() {
        // A slow asker with four on offer and a full request window asks for the next only as
        // the chunks of the one before come in. As long as it keeps asking us, the offers
        // behind are not stale; once it stops asking, they are, 2 s after its last request.
        let mut s = SuperSeed::new(32, 64 << 10);
        let (_, t0) = first_two(&mut s, 1, Instant::now(), Duration::from_secs(1));
        assert_eq!(s.offer(addr(1), |_| false, t0), vec![2, 3, 4, 5]);
        for (k, chunk) in (0..4).enumerate() {
            let t = t0 + OFFER_UNASKED / 4 * (k as u32 + 1);
            s.on_request(addr(1), 2, chunk, 4, t);
        }
        // Last request at t0 + 2 s: 3 s on, 3, 4 and 5 are still on offer; 2 went whole.
        let t = t0 + OFFER_UNASKED * 3 / 2;
        assert_eq!(s.offer(addr(1), |_| false, t), vec![6]);
        assert_eq!(s.given()[..7], [1, 1, 1, 1, 1, 1, 1]);
        // It asks nothing more: 2 s after its last request, 3, 4 and 5 are given up (6 was
        // told later and waits its own 2 s).
        let t = t0 + OFFER_UNASKED * 2;
        assert_eq!(s.offer(addr(1), |_| false, t), vec![7, 8, 9]);
        assert_eq!(s.given()[..10], [1, 1, 1, 0, 0, 0, 1, 1, 1, 1]);
    }

    #[test]
    fn an_offer_asked_for_in_part_is_given_up_after_a_while() {
        let mut s = SuperSeed::new(4, PIECE);
        let t0 = Instant::now();
        assert_eq!(s.offer(addr(1), |_| false, t0), vec![0]);
        // The peer keeps asking for the same chunk (never the rest): given up 30 s after it
        // was told, though its last request was a moment ago.
        let late = t0 + OFFER_UNFINISHED;
        s.on_request(addr(1), 0, 0, 4, late);
        assert_eq!(s.offer(addr(1), |_| false, late), vec![1]);
        assert_eq!(s.given(), &[0, 1, 0, 0]);
    }
}
