//! Torrent piece sizes and piece hashing, fed the archive bytes as they are written.
//!
//! The piece size depends on the archive's final size, which is unknown while the archive is
//! still being compressed. So the hasher runs one SHA-1 stream per *candidate* size (powers of two
//! around an estimate) and drops a candidate as soon as the bytes written so far prove it too
//! small; `finish` keeps the candidate [`piece_length_for`] would have picked for the real size
//! (or the nearest one when the estimate was off), so no second read of the archive is needed.

use sha1::{Digest, Sha1};

/// Smallest piece: 64 KiB (four 16 KiB requests), so an image under 125 MiB still has 1000 or
/// more pieces down to 62.5 MiB (and a 32 MiB one 512, not 128). Each hop of a piece through the
/// swarm costs one piece's time on a link, so few pieces make a boot storm slower: bench-swarm,
/// N = 64 (README, Performance, session 14), 8 MiB at 10 Mbit/s: 3.07 S/B with 256 KiB pieces
/// (32), 2.05 and 2.18 with 64 KiB (128), 2.04 and 2.21 with 32 KiB; 32 MiB at 5 Mbit/s without
/// unpack: 1.57-1.65 with 256 KiB, 1.37 and 1.39 with 64 KiB, 1.37 and 1.46 with 32 KiB. 16 KiB
/// (one request a piece, 512 pieces of 8 MiB) was slower: 2.73 and 2.75.
pub const MIN_PIECE: u64 = 64 * 1024;
pub const MAX_PIECE: u64 = 16 * 1024 * 1024;
/// Most pieces a torrent should have; with power-of-two sizes this lands between half and all of it.
pub const MAX_PIECES: u64 = 2000;

/// The piece size for an archive of `size` bytes: the smallest power of two from 64 KiB to
/// 16 MiB that keeps the torrent at or under 2000 pieces (so 1000–2000 pieces unless clamped).
pub fn piece_length_for(size: u64) -> u64 {
    piece_length_within(size, MAX_PIECES)
}

fn piece_length_within(size: u64, max_pieces: u64) -> u64 {
    let mut p = MIN_PIECE;
    while p < MAX_PIECE && size.div_ceil(p) > max_pieces {
        p *= 2;
    }
    p
}

/// Candidate piece sizes for an archive expected to be between `low` and `high` bytes.
pub fn candidates(low: u64, high: u64) -> Vec<u64> {
    let (low, high) = (low.min(high), low.max(high));
    let mut p = piece_length_for(low);
    let last = piece_length_for(high);
    let mut out = vec![p];
    while p < last {
        p *= 2;
        out.push(p);
    }
    out
}

struct Stream {
    piece_length: u64,
    hasher: Sha1,
    /// Bytes in the current, unfinished piece.
    filled: u64,
    pieces: Vec<[u8; 20]>,
}

impl Stream {
    fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let room = (self.piece_length - self.filled) as usize;
            let n = room.min(data.len());
            self.hasher.update(&data[..n]);
            self.filled += n as u64;
            data = &data[n..];
            if self.filled == self.piece_length {
                self.pieces.push(self.hasher.finalize_reset().into());
                self.filled = 0;
            }
        }
    }

    fn finish(mut self) -> Vec<[u8; 20]> {
        if self.filled > 0 {
            self.pieces.push(self.hasher.finalize().into());
        }
        self.pieces
    }
}

/// The pieces of a finished archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pieces {
    pub piece_length: u64,
    pub hashes: Vec<[u8; 20]>,
    pub total: u64,
}

/// SHA-1 piece hashes at one or more candidate piece sizes.
pub struct PieceHasher {
    streams: Vec<Stream>,
    written: u64,
    max_pieces: u64,
}

impl PieceHasher {
    /// `candidates` are powers of two (see [`candidates`]); an empty list means "the minimum".
    pub fn new(candidates: &[u64]) -> Self {
        Self::with_max_pieces(candidates, MAX_PIECES)
    }

    fn with_max_pieces(candidates: &[u64], max_pieces: u64) -> Self {
        let mut sizes: Vec<u64> = candidates.iter().map(|&c| c.clamp(MIN_PIECE, MAX_PIECE)).collect();
        if sizes.is_empty() {
            sizes.push(MIN_PIECE);
        }
        sizes.sort_unstable();
        sizes.dedup();
        let streams = sizes
            .into_iter()
            .map(|p| Stream { piece_length: p, hasher: Sha1::new(), filled: 0, pieces: Vec::new() })
            .collect();
        PieceHasher { streams, written: 0, max_pieces }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.written += data.len() as u64;
        // A candidate that already has too many pieces can never be chosen: stop paying for it,
        // but always keep the largest one.
        while self.streams.len() > 1 && self.written.div_ceil(self.streams[0].piece_length) > self.max_pieces {
            self.streams.remove(0);
        }
        for s in &mut self.streams {
            s.update(data);
        }
    }

    /// Keeps only the candidate that suits an archive of `predicted` bytes (or the nearest one),
    /// so one SHA-1 stream is paid for instead of several. Called once the compression ratio
    /// seen so far makes a good prediction; if the prediction misses, the torrent just has fewer
    /// or more pieces than ideal.
    pub fn narrow(&mut self, predicted: u64) {
        let want = piece_length_within(predicted.max(self.written), self.max_pieces);
        if let Some(keep) = self.nearest(want) {
            let s = self.streams.swap_remove(keep);
            self.streams = vec![s];
        }
    }

    fn nearest(&self, want: u64) -> Option<usize> {
        self.streams
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| (s.piece_length.max(want) / s.piece_length.min(want), s.piece_length < want))
            .map(|(i, _)| i)
    }

    /// Piece sizes still being hashed.
    pub fn active(&self) -> Vec<u64> {
        self.streams.iter().map(|s| s.piece_length).collect()
    }

    pub fn finish(self) -> Pieces {
        let want = piece_length_within(self.written, self.max_pieces);
        let total = self.written;
        // The wanted size if it was a candidate, else the nearest candidate.
        let idx = self.nearest(want).unwrap_or(0);
        let s = self.streams.into_iter().nth(idx).expect("at least one stream");
        let piece_length = s.piece_length;
        Pieces { piece_length, hashes: s.finish(), total }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn piece_length_is_clamped_power_of_two_aiming_at_1000_to_2000_pieces() {
        assert_eq!(piece_length_for(0), MIN_PIECE);
        assert_eq!(piece_length_for(10 * MIB), MIN_PIECE);
        assert_eq!(piece_length_for(32 * MIB), 64 * 1024); // 512 pieces
        assert_eq!(piece_length_for(125 * MIB), 64 * 1024); // exactly 2000 pieces
        assert_eq!(piece_length_for(125 * MIB + 1), 128 * 1024);
        assert_eq!(piece_length_for(500 * MIB), 256 * 1024); // exactly 2000 pieces
        assert_eq!(piece_length_for(500 * MIB + 1), 512 * 1024);
        assert_eq!(piece_length_for(4096 * MIB), 4 * MIB);
        assert_eq!(piece_length_for(1 << 40), MAX_PIECE);
        for size in [63 * MIB, 100 * MIB, 300 * MIB, 777 * MIB, 3000 * MIB, 20_000 * MIB, 31_000 * MIB] {
            let p = piece_length_for(size);
            assert!(p.is_power_of_two());
            let n = size.div_ceil(p);
            assert!((1000..=2000).contains(&n), "{size}: {p} gives {n} pieces");
        }
    }

    #[test]
    fn candidates_span_the_estimate() {
        assert_eq!(candidates(100 * MIB, 100 * MIB), vec![MIN_PIECE]);
        assert_eq!(candidates(1000 * MIB, 4000 * MIB), vec![512 * 1024, MIB, 2 * MIB]);
        assert_eq!(candidates(4000 * MIB, 1000 * MIB), vec![512 * 1024, MIB, 2 * MIB]);
    }

    fn sha1(data: &[u8]) -> [u8; 20] {
        Sha1::digest(data).into()
    }

    #[test]
    fn pieces_match_hashing_each_piece_separately_whatever_the_write_sizes() {
        let data: Vec<u8> = (0..(MIN_PIECE * 3 + 12345)).map(|i| (i * 7 % 251) as u8).collect();
        let mut h = PieceHasher::new(&[MIN_PIECE]);
        let mut rest = &data[..];
        let mut step = 1;
        while !rest.is_empty() {
            let n = step.min(rest.len());
            h.update(&rest[..n]);
            rest = &rest[n..];
            step = step * 3 + 1;
        }
        let p = h.finish();
        let want: Vec<[u8; 20]> = data.chunks(MIN_PIECE as usize).map(sha1).collect();
        assert_eq!(p.piece_length, MIN_PIECE);
        assert_eq!(p.total, data.len() as u64);
        assert_eq!(p.hashes, want);
    }

    #[test]
    fn the_candidate_fitting_the_real_size_wins_and_small_ones_are_dropped() {
        // The same logic with a limit of 4 pieces instead of 2000 keeps the data small:
        // 4 minimum pieces + 1 byte no longer fit minimum pieces.
        let size = (4 * MIN_PIECE + 1) as usize;
        let mut h = PieceHasher::with_max_pieces(&[MIN_PIECE, 2 * MIN_PIECE, 4 * MIN_PIECE], 4);
        let chunk = vec![7u8; 100_000];
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len());
            h.update(&chunk[..n]);
            left -= n;
        }
        assert_eq!(h.active(), vec![2 * MIN_PIECE, 4 * MIN_PIECE], "the minimum can no longer be chosen");
        let p = h.finish();
        assert_eq!(p.piece_length, 2 * MIN_PIECE);
        assert_eq!(p.hashes.len() as u64, (size as u64).div_ceil(2 * MIN_PIECE));
    }

    #[test]
    fn narrowing_keeps_one_stream_and_its_hashes_stay_right() {
        let data: Vec<u8> = (0..(3 * MIN_PIECE + 5)).map(|i| (i % 253) as u8).collect();
        let mut h = PieceHasher::with_max_pieces(&[MIN_PIECE, 2 * MIN_PIECE, 4 * MIN_PIECE], 4);
        h.update(&data[..1000]);
        // predicted 5 minimum pieces: pieces twice the minimum fit the limit of 4
        h.narrow(5 * MIN_PIECE);
        assert_eq!(h.active(), vec![2 * MIN_PIECE]);
        h.update(&data[1000..]);
        let p = h.finish();
        assert_eq!(p.piece_length, 2 * MIN_PIECE);
        let want: Vec<[u8; 20]> = data.chunks(2 * MIN_PIECE as usize).map(sha1).collect();
        assert_eq!(p.hashes, want);
        // a prediction below what was already written counts what was written
        let mut h = PieceHasher::with_max_pieces(&[MIN_PIECE, 2 * MIN_PIECE], 4);
        h.update(&data);
        h.narrow(10);
        assert_eq!(h.active(), vec![MIN_PIECE]);
    }

    #[test]
    fn an_estimate_that_was_too_high_falls_back_to_the_nearest_candidate() {
        let mut h = PieceHasher::new(&[4 * MIB, 8 * MIB]);
        h.update(&[1u8; 1000]);
        let p = h.finish();
        assert_eq!(p.piece_length, 4 * MIB);
        assert_eq!(p.hashes, vec![sha1(&[1u8; 1000])]);
    }

    #[test]
    fn empty_archive_has_no_pieces() {
        let p = PieceHasher::new(&[]).finish();
        assert_eq!((p.piece_length, p.hashes.len(), p.total), (MIN_PIECE, 0, 0));
    }
}
