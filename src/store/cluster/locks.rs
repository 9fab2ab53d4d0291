//! Per-user async locks, created on demand and dropped with their last holder.
//!
//! For work on one user that must not interleave with other work on the same user and
//! spans an `.await` on the network (a cluster store's compare-and-swap and the event it
//! publishes; an owner-index write), without making unrelated users wait.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::core::UserId;

#[derive(Default)]
pub struct UserLocks {
    map: Mutex<HashMap<UserId, Arc<tokio::sync::Mutex<()>>>>,
}

/// Held while the user's work runs; dropping it lets the next waiter in.
pub struct UserGuard<'a> {
    locks: &'a UserLocks,
    user: UserId,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl UserLocks {
    pub async fn lock(&self, user: &UserId) -> UserGuard<'_> {
        let lock = self.map.lock().entry(user.clone()).or_default().clone();
        let guard = lock.clone().lock_owned().await;
        UserGuard { locks: self, user: user.clone(), lock, guard: Some(guard) }
    }

    /// Users with a lock held or awaited now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for UserGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.locks.map.lock();
        // Only the map and this guard know the lock: nobody waits for it.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_user_at_a_time_others_unhindered_and_nothing_left_behind() {
        let locks = Arc::new(UserLocks::default());
        let a = UserId::parse("a", 8).unwrap();
        let b = UserId::parse("b", 8).unwrap();
        let g = locks.lock(&a).await;
        // Another user's lock is free.
        tokio::time::timeout(Duration::from_millis(100), locks.lock(&b)).await.expect("b is not blocked by a");
        // The same user's waits.
        let l2 = locks.clone();
        let a2 = a.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(&a2).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(g);
        waiter.await.unwrap();
        assert!(locks.is_empty(), "no lock kept for users nobody works on");
    }
}
