//! The events the engine reports to the store under it (what blkdebug's rules arm on): which
//! work reports which, and that the writes iotests 066 and 179 count happen as often as QEMU's.

use std::io;
use std::sync::{Arc, Mutex};

use qcow2::storage::Event;
use qcow2::{CreateOptions, Image, MemoryStorage, Storage};

/// A memory store that logs the events it is told of.
struct Logged {
    inner: MemoryStorage,
    log: Arc<Mutex<Vec<Event>>>,
}

impl Storage for Logged {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn event(&self, event: Event) {
        self.log.lock().unwrap().push(event);
    }
}

const CLUSTER: usize = 64 << 10;

fn image() -> (Image, Arc<Mutex<Vec<Event>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let store = Logged {
        inner: MemoryStorage::new(),
        log: log.clone(),
    };
    let options = CreateOptions::new(16 << 20);
    let image = Image::create_in(Box::new(store), "mem", &options).unwrap();
    (image, log)
}

fn taken(log: &Mutex<Vec<Event>>) -> Vec<Event> {
    std::mem::take(&mut *log.lock().unwrap())
}

#[test]
fn a_first_write_reports_allocation_data_and_each_table_it_updates() {
    let (image, log) = image();
    taken(&log);
    image.write_at(&[1; 4096], 0).unwrap();
    image.flush().unwrap();
    let events = taken(&log);
    for wanted in [
        Event::ClusterAlloc,
        Event::WriteAio,
        Event::L2Update,
        Event::L1Update,
        Event::RefblockUpdate,
    ] {
        assert!(
            events.contains(&wanted),
            "{wanted:?} missing from {events:?}"
        );
    }
    let mut buf = [0; 4096];
    image.read_at(&mut buf, 0).unwrap();
    assert!(taken(&log).contains(&Event::ReadAio));
}

#[test]
fn a_run_over_a_preallocated_zero_cluster_is_one_data_write() {
    let (image, log) = image();
    image.write_at(&vec![42; 3 * CLUSTER], 0).unwrap();
    let before = image.map(0, 3 * CLUSTER as u64).unwrap();
    image
        .write_zeroes(CLUSTER as u64, CLUSTER as u64, false)
        .unwrap();
    taken(&log);
    image.write_at(&vec![42; 3 * CLUSTER], 0).unwrap();
    let writes = taken(&log)
        .into_iter()
        .filter(|e| *e == Event::WriteAio)
        .count();
    assert_eq!(writes, 1);
    // The clusters stay where they were and read as data again.
    assert_eq!(image.map(0, 3 * CLUSTER as u64).unwrap(), before);
    let mut buf = vec![0; 3 * CLUSTER];
    image.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 42));
}

#[test]
fn zero_writes_over_zeros_leave_the_l2_table_alone() {
    let (image, log) = image();
    image.write_at(&vec![1; 2 * CLUSTER], 0).unwrap();
    image.write_zeroes(0, CLUSTER as u64, false).unwrap();
    image
        .write_zeroes(CLUSTER as u64, CLUSTER as u64, true)
        .unwrap();
    image.flush().unwrap();
    taken(&log);
    image.write_zeroes(0, CLUSTER as u64, false).unwrap();
    image
        .write_zeroes(CLUSTER as u64, CLUSTER as u64, true)
        .unwrap();
    image.flush().unwrap();
    let events = taken(&log);
    assert!(!events.contains(&Event::L2Update), "{events:?}");
}
