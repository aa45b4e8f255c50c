//! Node name → column position, looked up once per candidate of every
//! extender call (3,250 names a call at 65,000 nodes).
//!
//! The names lie back to back in one arena and the hash table holds only
//! positions, so a lookup touches the table's few cache lines and the
//! arena, which stays in cache across a call (~0.7 MB at 65,000 nodes),
//! instead of one heap allocation per name as a `HashMap<String, _>` does.

use std::hash::BuildHasher;

use foldhash::fast::RandomState;
use hashbrown::HashTable;

#[derive(Debug, Clone, Default)]
pub(super) struct NameIndex {
    /// Every name, back to back, in position order.
    arena: String,
    /// Per position, where its name ends in `arena`.
    ends: Vec<usize>,
    /// Positions, hashed by name. A fast hasher: node names come from the
    /// API server, not from an adversary.
    table: HashTable<u32>,
    hasher: RandomState,
}

impl NameIndex {
    /// Indexes `names`, distinct, in position order.
    pub(super) fn new<'a>(names: impl ExactSizeIterator<Item = &'a str>) -> Self {
        let mut index = NameIndex {
            ends: Vec::with_capacity(names.len()),
            table: HashTable::with_capacity(names.len()),
            ..NameIndex::default()
        };
        for name in names {
            index.arena.push_str(name);
            index.ends.push(index.arena.len());
            let position = u32::try_from(index.ends.len() - 1).unwrap_or(u32::MAX);
            let hash = index.hasher.hash_one(name);
            let (arena, ends, hasher) = (&index.arena, &index.ends, &index.hasher);
            index.table.insert_unique(hash, position, |&p| {
                hasher.hash_one(name_at(arena, ends, p as usize))
            });
        }
        index
    }

    /// The position of `name`, if indexed.
    pub(super) fn get(&self, name: &str) -> Option<usize> {
        let hash = self.hasher.hash_one(name);
        self.table
            .find(hash, |&p| {
                name_at(&self.arena, &self.ends, p as usize) == name
            })
            .map(|&p| p as usize)
    }
}

fn name_at<'a>(arena: &'a str, ends: &[usize], position: usize) -> &'a str {
    let start = position.checked_sub(1).map_or(0, |p| ends[p]);
    &arena[start..ends[position]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_name_and_nothing_else() {
        let names: Vec<String> = (0..1_000).map(|i| format!("node-{i}")).collect();
        let index = NameIndex::new(names.iter().map(String::as_str));
        for (position, name) in names.iter().enumerate() {
            assert_eq!(index.get(name), Some(position));
        }
        for absent in ["", "node-", "node-1000", "node-00", "ode-1"] {
            assert_eq!(index.get(absent), None, "{absent:?}");
        }
        assert_eq!(NameIndex::default().get("a"), None);
    }
}
