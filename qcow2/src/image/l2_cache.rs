//! A bounded cache of L2 tables keyed by host offset. Hits take a shared lock and bump an atomic
//! clock, so parallel readers do not serialize; a miss loads the table outside the lock and evicts
//! the least recently used entry when full.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::error::Result;

struct Slot {
    table: Arc<[u8]>,
    last_used: AtomicU64,
}

/// L2 tables in memory, at most `capacity` of them.
pub(crate) struct L2Cache {
    capacity: usize,
    slots: RwLock<HashMap<u64, Slot>>,
    clock: AtomicU64,
}

impl L2Cache {
    /// A cache holding at most `capacity` tables (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        L2Cache {
            capacity: capacity.max(1),
            slots: RwLock::new(HashMap::with_capacity(capacity.clamp(1, 1024))),
            clock: AtomicU64::new(0),
        }
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// The table at `host_offset`, loading it with `load` on a miss.
    pub(crate) fn get_or_load(
        &self,
        host_offset: u64,
        load: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Arc<[u8]>> {
        {
            let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
            if let Some(slot) = slots.get(&host_offset) {
                slot.last_used.store(self.tick(), Ordering::Relaxed);
                return Ok(slot.table.clone());
            }
        }
        let table: Arc<[u8]> = load()?.into();
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get(&host_offset) {
            // Another reader loaded it meanwhile; keep one copy.
            return Ok(slot.table.clone());
        }
        if slots.len() >= self.capacity {
            if let Some(victim) = slots
                .iter()
                .min_by_key(|(_, s)| s.last_used.load(Ordering::Relaxed))
                .map(|(k, _)| *k)
            {
                slots.remove(&victim);
            }
        }
        slots.insert(
            host_offset,
            Slot {
                table: table.clone(),
                last_used: AtomicU64::new(self.tick()),
            },
        );
        Ok(table)
    }

    /// Drops every cached table.
    #[allow(dead_code)]
    pub(crate) fn clear(&self) {
        self.slots
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used_table() {
        let cache = L2Cache::new(2);
        let loads = std::cell::Cell::new(0);
        let load = |v: u8| {
            loads.set(loads.get() + 1);
            Ok(vec![v; 4])
        };
        cache.get_or_load(1, || load(1)).unwrap();
        cache.get_or_load(2, || load(2)).unwrap();
        cache.get_or_load(1, || load(1)).unwrap();
        cache.get_or_load(3, || load(3)).unwrap(); // evicts 2
        assert_eq!(loads.get(), 3);
        assert_eq!(&*cache.get_or_load(1, || load(9)).unwrap(), &[1; 4]);
        assert_eq!(&*cache.get_or_load(2, || load(2)).unwrap(), &[2; 4]);
        assert_eq!(loads.get(), 4);
    }
}
