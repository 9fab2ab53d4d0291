//! A value split over mutex-guarded shards by key hash, so that unrelated keys do not
//! wait for each other: the embedded store's users, the hub's indexes, the rate limiters'
//! buckets. `parking_lot` mutexes, held for microseconds and never across an `.await`.

use std::hash::{BuildHasher, Hash};

use parking_lot::Mutex;

/// The hasher of the maps a heartbeat or a delivery looks up (the shards, the hub's
/// indexes, the sessions a cluster node holds): foldhash, seeded at random per map, since
/// the ids come from clients. With the standard SipHash, hashing was 9 % of a node's CPU
/// while it answered 150,000 sessions' heartbeats.
pub type FastState = foldhash::fast::RandomState;
pub type FastMap<K, V> = std::collections::HashMap<K, V, FastState>;

pub struct Sharded<T> {
    shards: Box<[Mutex<T>]>,
    hasher: FastState,
}

impl<T: Default> Sharded<T> {
    /// `n` shards, rounded up to a power of two.
    pub fn new(n: usize) -> Sharded<T> {
        Sharded::new_with(n, T::default)
    }
}

impl<T> Sharded<T> {
    /// `n` shards (rounded up to a power of two), each made by `make`.
    pub fn new_with(n: usize, make: impl Fn() -> T) -> Sharded<T> {
        Sharded { shards: (0..n.max(1).next_power_of_two()).map(|_| Mutex::new(make())).collect(), hasher: Default::default() }
    }

    /// The shard holding `key`.
    pub fn of<Q: Hash + ?Sized>(&self, key: &Q) -> &Mutex<T> {
        let h = self.hasher.hash_one(key) as usize;
        &self.shards[h & (self.shards.len() - 1)]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Mutex<T>> {
        self.shards.iter()
    }

    pub fn len(&self) -> usize {
        self.shards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn a_key_always_lands_in_the_same_shard() {
        let s: Sharded<HashMap<String, u32>> = Sharded::new(5);
        assert_eq!(s.len(), 8);
        for i in 0..100 {
            s.of(&format!("k{i}")).lock().insert(format!("k{i}"), i);
        }
        for i in 0..100 {
            assert_eq!(s.of(&format!("k{i}")).lock().get(&format!("k{i}")), Some(&i));
        }
        let total: usize = s.iter().map(|m| m.lock().len()).sum();
        assert_eq!(total, 100);
        assert!(s.iter().filter(|m| !m.lock().is_empty()).count() > 1, "spread over shards");
    }
}
