//! Refcount block packing for every width: 1, 2 and 4 bits pack LSB-first within a byte; 8 to 64
//! bits are big-endian integers.

/// Number of refcount entries in one refblock of `cluster_bits` with `refcount_order`.
pub fn entries_per_block(cluster_bits: u32, refcount_order: u32) -> u64 {
    1u64 << (cluster_bits + 3 - refcount_order)
}

/// Largest refcount the width can hold.
pub fn max_refcount(refcount_order: u32) -> u64 {
    if refcount_order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1 << refcount_order)) - 1
    }
}

/// Reads entry `index` of a refblock.
pub fn get(block: &[u8], index: usize, refcount_order: u32) -> u64 {
    match refcount_order {
        0..=2 => {
            let bits = 1usize << refcount_order;
            let bit = index * bits;
            let byte = block[bit / 8];
            ((byte >> (bit % 8)) as u64) & ((1 << bits) - 1)
        }
        3 => block[index] as u64,
        4 => u16::from_be_bytes([block[index * 2], block[index * 2 + 1]]) as u64,
        5 => {
            u32::from_be_bytes(block[index * 4..index * 4 + 4].try_into().expect("4 bytes")) as u64
        }
        _ => u64::from_be_bytes(block[index * 8..index * 8 + 8].try_into().expect("8 bytes")),
    }
}

/// Writes entry `index` of a refblock; `value` must fit the width.
pub fn set(block: &mut [u8], index: usize, refcount_order: u32, value: u64) {
    debug_assert!(value <= max_refcount(refcount_order));
    match refcount_order {
        0..=2 => {
            let bits = 1usize << refcount_order;
            let bit = index * bits;
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            let byte = &mut block[bit / 8];
            *byte = (*byte & !mask) | (((value as u8) << (bit % 8)) & mask);
        }
        3 => block[index] = value as u8,
        4 => block[index * 2..index * 2 + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[index * 4..index * 4 + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[index * 8..index * 8 + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

/// Appends entries `first..first + count` of a refblock to `out`.
pub fn get_range(
    block: &[u8],
    first: usize,
    count: usize,
    refcount_order: u32,
    out: &mut Vec<u64>,
) {
    match refcount_order {
        3 => out.extend(block[first..first + count].iter().map(|&b| b as u64)),
        4 => out.extend(
            block[first * 2..(first + count) * 2]
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]) as u64),
        ),
        _ => out.extend((first..first + count).map(|i| get(block, i, refcount_order))),
    }
}

/// The first entry of `first..first + count` that is zero (a free cluster), if any.
pub fn first_zero(block: &[u8], first: usize, count: usize, refcount_order: u32) -> Option<usize> {
    match refcount_order {
        3 => block[first..first + count].iter().position(|&b| b == 0),
        4 => block[first * 2..(first + count) * 2]
            .chunks_exact(2)
            .position(|c| c == [0, 0]),
        _ => (first..first + count).position(|i| get(block, i, refcount_order) == 0),
    }
    .map(|i| first + i)
}

/// The first entry of `first..first + count` (with its value) that `delta` would move outside
/// `0..=max_refcount`, if any.
pub fn find_out_of_range(
    block: &[u8],
    first: usize,
    count: usize,
    refcount_order: u32,
    delta: i64,
) -> Option<(usize, u64)> {
    let max = max_refcount(refcount_order) as i128;
    let bad = |v: u64| {
        let n = v as i128 + delta as i128;
        n < 0 || n > max
    };
    match refcount_order {
        4 => block[first * 2..(first + count) * 2]
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]) as u64)
            .enumerate()
            .find(|&(_, v)| bad(v))
            .map(|(i, v)| (first + i, v)),
        _ => (first..first + count)
            .map(|i| (i, get(block, i, refcount_order)))
            .find(|&(_, v)| bad(v)),
    }
}

/// Adds `delta` to entries `first..first + count` of a refblock, calling `zeroed` with each entry
/// that ends at zero. Every result must fit the width ([`find_out_of_range`] checks).
pub fn add_range(
    block: &mut [u8],
    first: usize,
    count: usize,
    refcount_order: u32,
    delta: i64,
    mut zeroed: impl FnMut(usize),
) {
    match refcount_order {
        4 => {
            for (i, c) in block[first * 2..(first + count) * 2]
                .chunks_exact_mut(2)
                .enumerate()
            {
                let n = (u16::from_be_bytes([c[0], c[1]]) as i64 + delta) as u16;
                c.copy_from_slice(&n.to_be_bytes());
                if n == 0 {
                    zeroed(first + i);
                }
            }
        }
        _ => {
            for i in first..first + count {
                let n = (get(block, i, refcount_order) as i128 + delta as i128) as u64;
                set(block, i, refcount_order, n);
                if n == 0 {
                    zeroed(i);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_matches_bytes_seen_in_qemu_images() {
        // Six used clusters with refcount 1, as qemu-img writes them for each width.
        let expected: [(u32, &[u8]); 4] = [
            (0, &[0x3f]),
            (1, &[0x55, 0x05]),
            (2, &[0x11, 0x11, 0x11]),
            (4, &[0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1]),
        ];
        for (order, bytes) in expected {
            let mut block = vec![0u8; 64];
            for i in 0..6 {
                set(&mut block, i, order, 1);
            }
            assert_eq!(&block[..bytes.len()], bytes, "order {order}");
            assert!((0..6).all(|i| get(&block, i, order) == 1));
            assert_eq!(get(&block, 6, order), 0);
        }
    }

    #[test]
    fn range_helpers_agree_with_single_entries_for_every_width() {
        for order in 0..=6u32 {
            let max = max_refcount(order);
            let mut block = vec![0u8; 128];
            let n = 1024 >> order;
            // Entry 0 is free; the others hold 1 ..= max.
            for i in 1..n {
                set(&mut block, i, order, 1 + (i as u64 * 7) % max.min(5));
            }
            let mut got = Vec::new();
            get_range(&block, 3, n - 5, order, &mut got);
            let want: Vec<u64> = (3..n - 2).map(|i| get(&block, i, order)).collect();
            assert_eq!(got, want, "order {order}");
            // The first entry at 0 cannot drop, the first at max cannot rise.
            assert_eq!(find_out_of_range(&block, 0, n, order, -1), Some((0, 0)));
            let before = block.clone();
            let mut zeroed = Vec::new();
            let ones: Vec<usize> = (1..n).filter(|&i| get(&block, i, order) == 1).collect();
            assert!(!ones.is_empty());
            assert_eq!(find_out_of_range(&block, 1, n - 1, order, -1), None);
            add_range(&mut block, 1, n - 1, order, -1, |i| zeroed.push(i));
            assert_eq!(zeroed, ones, "order {order}");
            for i in 1..n {
                assert_eq!(get(&block, i, order), get(&before, i, order) - 1);
            }
            assert_eq!(first_zero(&block, 0, n, order), Some(0));
            assert_eq!(first_zero(&before, 1, n - 1, order), None);
            assert_eq!(
                first_zero(&block, 1, n - 1, order),
                ones.first().copied(),
                "order {order}"
            );
            let mut b = vec![0u8; 128];
            add_range(&mut b, 2, 5, order, 1, |_| panic!("nothing ends at zero"));
            assert!((0..n).all(|i| get(&b, i, order) == u64::from((2..7).contains(&i))));
            set(&mut b, 9, order, max);
            assert_eq!(find_out_of_range(&b, 7, n - 7, order, 1), Some((9, max)));
        }
    }

    #[test]
    fn every_width_round_trips_its_maximum() {
        for order in 0..=6 {
            let mut block = vec![0u8; 512];
            let max = max_refcount(order);
            set(&mut block, 3, order, max);
            set(&mut block, 4, order, 1);
            assert_eq!(get(&block, 3, order), max);
            assert_eq!(get(&block, 4, order), 1);
            assert_eq!(get(&block, 2, order), 0);
        }
    }
}
