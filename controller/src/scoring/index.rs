//! The node index a placement searches instead of scoring every node.
//!
//! A score is a slot term (0, or one of 16 values in 64..=79, from the
//! pool's free slots less assumed placements) plus an image term (0..=20).
//! So the nodes of a pool key are kept in one bitset per slot term
//! ([`SlotBuckets`], ready nodes only, moved between bitsets as claims,
//! refills and assumptions change their free slots), and images held by at
//! least 1/[`DENSE_SHARE`] of the nodes get a bitset of their holders
//! ([`ImageIndex`]). For a request, every node holding exactly a subset `S`
//! of the requested common images has the same image term, so the best node
//! of (slot term, `S`) is the first set bit of the intersection of a few
//! bitsets (nodes are sorted by name: the first is the smallest name). The
//! search visits (slot term, `S`) pairs from the highest possible score
//! down and stops at the first pair that cannot beat the best node found.
//!
//! Holders of the requested images that are rare (fewer than
//! 1/[`DENSE_SHARE`] of the nodes), reported with different sizes on
//! different nodes, or beyond [`MAX_DENSE`] common images are few (or
//! unusual) and are scored one by one first. The bitset search may meet
//! them again with an image term that leaves their rare images out: that
//! is an underestimate of a node already scored exactly, so it can never
//! displace the right answer (see [`Scorer::search`]).

use fixedbitset::FixedBitSet;

use super::{image_term, slot_term, Scorer, SlotPolicy, SLOT_FLOOR, SLOT_RANGE};

/// An image held by at least `1/DENSE_SHARE` of the nodes gets a bitset of
/// its holders (n/8 bytes, no more than its holder list's n/64 × 16 bytes).
pub(super) const DENSE_SHARE: usize = 64;
/// At most this many distinct common images of one request are searched
/// through bitsets (2^MAX_DENSE subsets); the rest are scored holder by
/// holder.
pub(super) const MAX_DENSE: usize = 5;
/// One bucket for "no free slot" and one per slot term value 60..=79.
pub(super) const BUCKETS: usize = SLOT_RANGE as usize + 1;
const BITS: usize = usize::BITS as usize;

/// The bucket of a pool with `free` slots (free less assumed).
pub(super) fn bucket_of(free: u32) -> usize {
    match slot_term(free) {
        0 => 0,
        term => usize::from(term) + 1 - SLOT_FLOOR as usize,
    }
}

/// The slot term of every node in `bucket`.
fn bucket_term(bucket: usize) -> u8 {
    match bucket {
        0 => 0,
        b => u8::try_from(SLOT_FLOOR as usize + b - 1).unwrap_or(u8::MAX),
    }
}

/// The ready nodes having one pool key, by the slot term of their free
/// slots less assumed placements.
#[derive(Debug, Clone)]
pub(super) struct SlotBuckets {
    sets: Vec<FixedBitSet>,
    counts: [u32; BUCKETS],
}

impl SlotBuckets {
    pub(super) fn new(nodes: usize) -> Self {
        SlotBuckets {
            sets: vec![FixedBitSet::with_capacity(nodes); BUCKETS],
            counts: [0; BUCKETS],
        }
    }

    pub(super) fn insert(&mut self, index: usize, free: u32) {
        let bucket = bucket_of(free);
        if !self.sets[bucket].put(index) {
            self.counts[bucket] += 1;
        }
    }

    /// Takes the node out of the bucket of `free` slots; whether it was
    /// there.
    fn remove(&mut self, index: usize, free: u32) -> bool {
        let bucket = bucket_of(free);
        let member = self.sets[bucket].contains(index);
        if member {
            self.sets[bucket].set(index, false);
            self.counts[bucket] -= 1;
        }
        member
    }

    /// The node's free slots went from `old` to `new`.
    pub(super) fn moved(&mut self, index: usize, old: u32, new: u32) {
        if bucket_of(old) != bucket_of(new) && self.remove(index, old) {
            self.insert(index, new);
        }
    }

    /// The node was a member with `old` free slots (`None`: not a member)
    /// and is one with `new` now.
    pub(super) fn replace(&mut self, index: usize, old: Option<u32>, new: Option<u32>) {
        if let Some(old) = old {
            self.remove(index, old);
        }
        if let Some(new) = new {
            self.insert(index, new);
        }
    }

    /// Which bucket holds the node, if any (tests).
    #[cfg(test)]
    pub(super) fn bucket_of_node(&self, index: usize) -> Option<usize> {
        self.sets.iter().position(|set| set.contains(index))
    }
}

/// Per common image, a bitset of its holders; per image, whether its
/// holders agree on its size. (Whether a node holds a rare image is a
/// binary search in the image's holder list, which stays in cache across
/// the candidates of one extender call.)
#[derive(Debug, Clone, Default)]
pub(super) struct ImageIndex {
    /// Per image: its holders, when at least 1/[`DENSE_SHARE`] of nodes.
    dense: Vec<Option<FixedBitSet>>,
    /// Per image: (size, holders reporting it), one entry per distinct
    /// size (almost always one), so a node's change updates it in place.
    sizes: Vec<Vec<(u64, u32)>>,
}

impl ImageIndex {
    /// From each image's (node position, size) holders, by position.
    pub(super) fn new(image_nodes: &[Vec<(u32, u64)>], nodes: usize) -> Self {
        let mut index = ImageIndex {
            dense: Vec::with_capacity(image_nodes.len()),
            sizes: Vec::with_capacity(image_nodes.len()),
        };
        for holders in image_nodes {
            let common = is_common(holders.len(), nodes);
            index.dense.push(common.then(|| bitset(holders, nodes)));
            let mut sizes = Vec::new();
            for &(_, size) in holders {
                count_size(&mut sizes, size, true);
            }
            index.sizes.push(sizes);
        }
        index
    }

    /// A new image no node holds yet.
    pub(super) fn push(&mut self) {
        self.dense.push(None);
        self.sizes.push(Vec::new());
    }

    /// Node `index` held image `id` with size `old` and holds it with
    /// `new` now (`None`: not held); `holders` is the image's holder list,
    /// already updated, and `nodes` the snapshot's size.
    pub(super) fn holder_changed(
        &mut self,
        id: usize,
        index: usize,
        (old, new): (Option<u64>, Option<u64>),
        holders: &[(u32, u64)],
        nodes: usize,
    ) {
        if let Some(size) = old {
            count_size(&mut self.sizes[id], size, false);
        }
        if let Some(size) = new {
            count_size(&mut self.sizes[id], size, true);
        }
        let dense = &mut self.dense[id];
        match (is_common(holders.len(), nodes), dense.as_mut()) {
            (false, _) => *dense = None,
            (true, None) => *dense = Some(bitset(holders, nodes)),
            (true, Some(set)) => set.set(index, new.is_some()),
        }
    }

    /// Whether image `id` has a holder bitset (tests).
    #[cfg(test)]
    pub(super) fn dense_holders(&self, id: usize) -> Option<Vec<usize>> {
        self.dense[id].as_ref().map(|set| set.ones().collect())
    }

    /// The size of image `id` on node `index`, `None` when the node does
    /// not hold it; `holders` is the image's holder list.
    pub(super) fn size_on(&self, index: usize, id: u32, holders: &[(u32, u64)]) -> Option<u64> {
        if let Some(set) = &self.dense[id as usize] {
            if !set.contains(index) {
                return None;
            }
            if let Some(size) = self.same_size(id) {
                return Some(size);
            }
        }
        let position = u32::try_from(index).ok()?;
        let at = holders
            .binary_search_by_key(&position, |&(node, _)| node)
            .ok()?;
        Some(holders[at].1)
    }

    /// The size all holders of `id` report, if they agree.
    pub(super) fn same_size(&self, id: u32) -> Option<u64> {
        match self.sizes[id as usize].as_slice() {
            [(size, _)] => Some(*size),
            _ => None,
        }
    }
}

/// Whether an image held by `holders` of `nodes` nodes gets a bitset.
fn is_common(holders: usize, nodes: usize) -> bool {
    holders > 0 && holders.saturating_mul(DENSE_SHARE) >= nodes
}

fn bitset(holders: &[(u32, u64)], nodes: usize) -> FixedBitSet {
    let mut set = FixedBitSet::with_capacity(nodes);
    set.extend(holders.iter().map(|&(node, _)| node as usize));
    set
}

/// Counts one more (`add`) or one fewer holder reporting `size`.
fn count_size(sizes: &mut Vec<(u64, u32)>, size: u64, add: bool) {
    match sizes.iter().position(|&(s, _)| s == size) {
        Some(at) if add => sizes[at].1 += 1,
        Some(at) => {
            sizes[at].1 -= 1;
            if sizes[at].1 == 0 {
                sizes.swap_remove(at);
            }
        }
        None if add => sizes.push((size, 1)),
        None => {}
    }
}

impl<'s> Scorer<'s> {
    /// The best (score, node position) among ready, fresh nodes with the
    /// request's pool (and, under `require`, a free slot) that `keep`
    /// accepts: highest score, then smallest position (name).
    pub(super) fn search(&self, keep: &mut dyn FnMut(&str) -> bool) -> Option<(u8, usize)> {
        let key = self.pool?;
        let snapshot = self.snapshot;
        let images = &snapshot.images;
        let (dense, exact) = self.split_images();
        let name = |index: usize| snapshot.nodes[index].name.as_str();
        let improves = |best: Option<(u8, usize)>, score: u8, index: usize| {
            best.is_none_or(|(s, i)| score > s || (score == s && index < i))
        };
        let mut best = None;
        // Holders of rare or unevenly sized images, scored exactly.
        for &id in &exact {
            for &(node, _) in &snapshot.image_nodes[id as usize] {
                let index = node as usize;
                if let Ok(score) = self.score_index(index) {
                    if improves(best, score, index) && keep(name(index)) {
                        best = Some((score, index));
                    }
                }
            }
        }
        // (score every node in it would get, bucket, subset of `dense`).
        let buckets = &snapshot.buckets[key];
        let mut pairs: Vec<(u8, usize, u32)> = Vec::new();
        for subset in 0..1u32 << dense.len() {
            let image = image_term(self.subset_bytes(&dense, subset), self.requested);
            for (bucket, &count) in buckets.counts.iter().enumerate() {
                let open = bucket > 0 || self.policy.slots == SlotPolicy::Prefer;
                if count > 0 && open {
                    pairs.push((bucket_term(bucket) + image, bucket, subset));
                }
            }
        }
        pairs.sort_unstable_by_key(|pair| std::cmp::Reverse(pair.0));
        let holders: Vec<&[usize]> = dense
            .iter()
            .filter_map(|&id| images.dense[id as usize].as_ref())
            .map(FixedBitSet::as_slice)
            .collect();
        for (score, bucket, subset) in pairs {
            let limit = match best {
                Some((s, _)) if score < s => break,
                Some((s, index)) if score == s => index,
                _ => snapshot.len(),
            };
            let members = buckets.sets[bucket].as_slice();
            let mut accept = |index: usize| self.fresh(index) && keep(name(index));
            if let Some(index) = first_match(members, &holders, subset, limit, &mut accept) {
                best = Some((score, index));
            }
        }
        best
    }

    /// The request's distinct known images: common ones of one size (at
    /// most [`MAX_DENSE`]) to search by bitset, and the rest.
    fn split_images(&self) -> (Vec<u32>, Vec<u32>) {
        let images = &self.snapshot.images;
        let (mut dense, mut exact) = (Vec::new(), Vec::new());
        for entry in &self.entries {
            if dense.contains(&entry.id) || exact.contains(&entry.id) {
                continue;
            }
            let common = images.dense[entry.id as usize].is_some()
                && images.same_size(entry.id).is_some()
                && dense.len() < MAX_DENSE;
            if common {
                dense.push(entry.id);
            } else {
                exact.push(entry.id);
            }
        }
        (dense, exact)
    }

    /// The spread-scaled bytes of a node holding exactly `subset` (bit `b`:
    /// `dense[b]`) of the common images, summed per requested image as
    /// [`Scorer::score`] does.
    fn subset_bytes(&self, dense: &[u32], subset: u32) -> u64 {
        let mut scaled = 0u64;
        for entry in &self.entries {
            let held = dense
                .iter()
                .position(|&id| id == entry.id)
                .is_some_and(|bit| subset & (1 << bit) != 0);
            if held {
                let on_node = self.snapshot.images.same_size(entry.id).unwrap_or(0);
                scaled = scaled.saturating_add(entry.contribution(on_node));
            }
        }
        scaled
    }
}

/// The first position below `limit` in `members`, in every `holders[b]`
/// whose bit `b` is set in `subset` and in none of the others, that
/// `accept` takes.
fn first_match(
    members: &[usize],
    holders: &[&[usize]],
    subset: u32,
    limit: usize,
    accept: &mut dyn FnMut(usize) -> bool,
) -> Option<usize> {
    for (w, &word) in members.iter().enumerate().take(limit.div_ceil(BITS)) {
        let mut word = word;
        for (bit, set) in holders.iter().enumerate() {
            if word == 0 {
                break;
            }
            word &= if subset & (1 << bit) != 0 {
                set[w]
            } else {
                !set[w]
            };
        }
        while word != 0 {
            let index = w * BITS + word.trailing_zeros() as usize;
            if index >= limit {
                return None;
            }
            if accept(index) {
                return Some(index);
            }
            word &= word - 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_slot_term() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_term(bucket_of(0)), 0);
        for free in [1, 2, 3, 4, 7, 8, 100, u32::MAX] {
            let bucket = bucket_of(free);
            assert!(bucket > 0 && bucket < BUCKETS, "{free} → {bucket}");
            assert_eq!(bucket_term(bucket), slot_term(free), "{free}");
        }
    }

    #[test]
    fn first_match_honours_the_subset_and_the_limit() {
        // Members 1, 3, 70; image holders: 3 and 70.
        let mut members = FixedBitSet::with_capacity(130);
        let mut image = FixedBitSet::with_capacity(130);
        for i in [1, 3, 70] {
            members.insert(i);
        }
        for i in [3, 70] {
            image.insert(i);
        }
        let holders = [image.as_slice()];
        let all = |_: usize| true;
        let m = members.as_slice();
        assert_eq!(first_match(m, &holders, 1, 130, &mut all.clone()), Some(3));
        assert_eq!(first_match(m, &holders, 0, 130, &mut all.clone()), Some(1));
        assert_eq!(first_match(m, &holders, 1, 3, &mut all.clone()), None);
        let mut not_three = |i| i != 3;
        assert_eq!(first_match(m, &holders, 1, 130, &mut not_three), Some(70));
    }
}
