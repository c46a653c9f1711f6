//! A bounded cache of L2 tables keyed by host offset. Hits take a shared lock and bump an atomic
//! clock, so parallel readers do not serialize; a miss loads the table outside the lock and evicts
//! the least recently used clean entry when full, and the next miss reads into the evicted
//! table's buffer when no reader holds it (no zeroing, no copy per miss). Dirty tables (changed by the writer, not yet on
//! disk) are never evicted: the writer writes them back in dependency order (see `writeback`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::error::Result;
use crate::image::cluster_map::ClusterMap;

struct Slot {
    table: Arc<[u8]>,
    last_used: AtomicU64,
    dirty: bool,
}

/// L2 tables in memory, at most `capacity` clean ones.
pub(crate) struct L2Cache {
    capacity: usize,
    slots: RwLock<ClusterMap<Slot>>,
    clock: AtomicU64,
    /// How many slots are dirty; changed only under the slots' write lock, read without it.
    dirty: AtomicUsize,
    /// The last evicted table, when nothing else holds it: the next miss loads into it.
    spare: Mutex<Option<Arc<[u8]>>>,
}

impl L2Cache {
    /// A cache holding at most `capacity` tables (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        L2Cache {
            capacity: capacity.max(1),
            slots: RwLock::new(ClusterMap::with_capacity_and_hasher(
                capacity.clamp(1, 1024),
                Default::default(),
            )),
            clock: AtomicU64::new(0),
            dirty: AtomicUsize::new(0),
            spare: Mutex::new(None),
        }
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    fn write_slots(&self) -> std::sync::RwLockWriteGuard<'_, ClusterMap<Slot>> {
        self.slots.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The table at `host_offset`, loading it with `load` into a `len`-byte buffer on a miss.
    pub(crate) fn get_or_load(
        &self,
        host_offset: u64,
        len: usize,
        load: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<Arc<[u8]>> {
        {
            let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
            if let Some(slot) = slots.get(&host_offset) {
                slot.last_used.store(self.tick(), Ordering::Relaxed);
                return Ok(slot.table.clone());
            }
        }
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut table = match spare {
            Some(t) if t.len() == len => t,
            // One allocation, written in place (collecting into a Vec first would copy it).
            _ => std::iter::repeat_n(0u8, len).collect(),
        };
        let bytes = Arc::get_mut(&mut table).expect("a spare table has no other holder");
        load(bytes)?;
        Ok(self.insert(host_offset, table, false))
    }

    /// Puts a table in the cache (replacing any copy) and returns the cached copy.
    pub(crate) fn insert(&self, host_offset: u64, table: Arc<[u8]>, dirty: bool) -> Arc<[u8]> {
        let mut slots = self.write_slots();
        if !dirty {
            if let Some(slot) = slots.get(&host_offset) {
                // Another reader loaded it meanwhile; keep one copy.
                return slot.table.clone();
            }
        }
        let clean = slots.len() - self.dirty.load(Ordering::Relaxed);
        if clean >= self.capacity && !slots.contains_key(&host_offset) {
            if let Some(victim) = slots
                .iter()
                .filter(|(_, s)| !s.dirty)
                .min_by_key(|(_, s)| s.last_used.load(Ordering::Relaxed))
                .map(|(k, _)| *k)
            {
                if let Some(mut old) = slots.remove(&victim) {
                    if Arc::get_mut(&mut old.table).is_some() {
                        *self.spare.lock().unwrap_or_else(|e| e.into_inner()) = Some(old.table);
                    }
                }
            }
        }
        let replaced = slots.insert(
            host_offset,
            Slot {
                table: table.clone(),
                last_used: AtomicU64::new(self.tick()),
                dirty,
            },
        );
        let was_dirty = replaced.is_some_and(|s| s.dirty);
        self.count_change(was_dirty, dirty);
        table
    }

    /// Changes a cached table in place and marks it dirty. The table must be cached.
    pub(crate) fn modify(&self, host_offset: u64, change: impl FnOnce(&mut [u8])) {
        let mut slots = self.write_slots();
        let Some(slot) = slots.get_mut(&host_offset) else {
            debug_assert!(false, "modify of an L2 table that is not cached");
            return;
        };
        match Arc::get_mut(&mut slot.table) {
            Some(bytes) => change(bytes),
            None => {
                // A reader still holds the old copy: give the cache a fresh one.
                let mut bytes = slot.table.to_vec();
                change(&mut bytes);
                slot.table = bytes.into();
            }
        }
        let was_dirty = std::mem::replace(&mut slot.dirty, true);
        self.count_change(was_dirty, true);
    }

    /// Keeps the dirty count in step with one slot going from `was` to `now`.
    fn count_change(&self, was: bool, now: bool) {
        match (was, now) {
            (false, true) => {
                self.dirty.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                self.dirty.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// The dirty tables, in offset order.
    pub(crate) fn dirty_tables(&self) -> Vec<(u64, Arc<[u8]>)> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        let mut dirty: Vec<_> = slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(k, s)| (*k, s.table.clone()))
            .collect();
        dirty.sort_by_key(|(k, _)| *k);
        dirty
    }

    /// How many tables are dirty.
    pub(crate) fn dirty_count(&self) -> usize {
        self.dirty.load(Ordering::Relaxed)
    }

    /// Marks a table as written back.
    pub(crate) fn mark_clean(&self, host_offset: u64) {
        if let Some(slot) = self.write_slots().get_mut(&host_offset) {
            let was_dirty = std::mem::replace(&mut slot.dirty, false);
            self.count_change(was_dirty, false);
        }
    }

    /// Drops a table whose cluster was freed, so the overlap guard does not mistake the
    /// cluster's next use for an L2 table.
    pub(crate) fn remove(&self, host_offset: u64) {
        let removed = self.write_slots().remove(&host_offset);
        self.count_change(removed.is_some_and(|s| s.dirty), false);
    }

    /// The offsets of every cached table (for the overlap guard).
    pub(crate) fn contains(&self, host_offset: u64) -> bool {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.contains_key(&host_offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used_clean_table() {
        let cache = L2Cache::new(2);
        let loads = std::cell::Cell::new(0);
        let load = |v: u8| {
            let loads = &loads;
            move |t: &mut [u8]| {
                loads.set(loads.get() + 1);
                t.fill(v);
                Ok(())
            }
        };
        cache.get_or_load(1, 4, load(1)).unwrap();
        cache.get_or_load(2, 4, load(2)).unwrap();
        cache.get_or_load(1, 4, load(1)).unwrap();
        cache.get_or_load(3, 4, load(3)).unwrap(); // evicts 2
        assert_eq!(loads.get(), 3);
        assert_eq!(&*cache.get_or_load(1, 4, load(9)).unwrap(), &[1; 4]);
        assert_eq!(&*cache.get_or_load(2, 4, load(2)).unwrap(), &[2; 4]);
        assert_eq!(loads.get(), 4);
    }

    #[test]
    fn dirty_tables_are_never_evicted() {
        let cache = L2Cache::new(1);
        let fill = |v: u8| {
            move |t: &mut [u8]| {
                t.fill(v);
                Ok(())
            }
        };
        cache.get_or_load(1, 4, fill(1)).unwrap();
        cache.modify(1, |t| t[0] = 7);
        cache.get_or_load(2, 4, fill(2)).unwrap();
        cache.get_or_load(3, 4, fill(3)).unwrap();
        assert_eq!(cache.dirty_tables().len(), 1);
        assert_eq!(cache.dirty_count(), 1);
        cache.modify(1, |t| t[1] = 8);
        assert_eq!(
            cache.dirty_count(),
            1,
            "a second change to a dirty table counts once"
        );
        assert_eq!(cache.dirty_tables()[0].1[0], 7);
        cache.mark_clean(1);
        assert_eq!(cache.dirty_count(), 0);
    }

    #[test]
    fn a_miss_reuses_the_evicted_buffer_only_when_nobody_holds_it() {
        let cache = L2Cache::new(1);
        let fill = |v: u8| {
            move |t: &mut [u8]| {
                t[1..].fill(v);
                Ok(())
            }
        };
        let held = cache.get_or_load(1, 4, fill(1)).unwrap();
        // 1 is evicted while `held` still holds it: 2 gets a fresh, zeroed buffer.
        assert_eq!(&*cache.get_or_load(2, 4, fill(2)).unwrap(), &[0, 2, 2, 2]);
        assert_eq!(&*held, &[0, 1, 1, 1], "a reader's copy never changes");
        // 2 is evicted with no holder: 3 loads into its buffer.
        assert_eq!(&*cache.get_or_load(3, 4, fill(3)).unwrap(), &[0, 3, 3, 3]);
    }
}
