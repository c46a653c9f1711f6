//! The refcount changes of a snapshot operation, kept as runs of clusters that change by the same
//! amount. A layer's clusters lie mostly in ascending runs, so an image with a million clusters
//! yields a few thousand runs, not a million map entries. Settling sums overlapping runs once into
//! disjoint segments in ascending order, which the refcount blocks then take one block at a time.

/// Cluster indexes `[start, end)` whose refcounts all change by `delta`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub start: u64,
    pub end: u64,
    pub delta: i64,
}

impl Segment {
    pub(crate) fn len(&self) -> u64 {
        self.end - self.start
    }
}

/// Runs of refcount changes, collected in any order; runs may overlap and then add up.
#[derive(Default)]
pub(crate) struct RefcountDeltas {
    runs: Vec<Segment>,
}

impl RefcountDeltas {
    /// Adds `delta` to every cluster that host bytes `[offset, offset + len)` touch.
    pub(crate) fn add_bytes(&mut self, offset: u64, len: u64, delta: i64, cluster_bits: u32) {
        if len == 0 {
            return;
        }
        let first = offset >> cluster_bits;
        let last = (offset + (len - 1)) >> cluster_bits;
        self.add_clusters(first, last + 1, delta);
    }

    /// Adds `delta` to every cluster index in `[start, end)`.
    pub(crate) fn add_clusters(&mut self, start: u64, end: u64, delta: i64) {
        if start >= end || delta == 0 {
            return;
        }
        if let Some(last) = self.runs.last_mut() {
            if last.end == start && last.delta == delta {
                last.end = end;
                return;
            }
        }
        self.runs.push(Segment { start, end, delta });
    }

    /// Adds `delta` to every cluster of a list of `[start, end)` runs.
    pub(crate) fn add_runs(&mut self, runs: &[(u64, u64)], delta: i64) {
        for &(start, end) in runs {
            self.add_clusters(start, end, delta);
        }
    }

    /// Adds settled segments back in.
    pub(crate) fn add_segments(&mut self, segments: &[Segment]) {
        for s in segments {
            self.add_clusters(s.start, s.end, s.delta);
        }
    }

    /// The net change of every cluster, as disjoint segments in ascending order; clusters whose
    /// changes cancel out are left out, and neighbours with the same change are merged.
    pub(crate) fn settle(&self) -> Vec<Segment> {
        // Each run starts adding its delta at `start` and stops at `end`. Runs pushed in walk
        // order mostly ascend, which the stable sort takes in linear time.
        let mut events: Vec<(u64, i64)> = Vec::with_capacity(self.runs.len() * 2);
        for r in &self.runs {
            events.push((r.start, r.delta));
            events.push((r.end, -r.delta));
        }
        events.sort_by_key(|e| e.0);
        let mut out: Vec<Segment> = Vec::new();
        let mut sum: i64 = 0;
        let mut at = 0;
        for (pos, change) in events {
            if pos > at && sum != 0 {
                match out.last_mut() {
                    Some(last) if last.end == at && last.delta == sum => last.end = pos,
                    _ => out.push(Segment {
                        start: at,
                        end: pos,
                        delta: sum,
                    }),
                }
            }
            sum += change;
            at = pos;
        }
        out
    }
}

/// Finds the settled segment holding a cluster. Lookups mostly ascend, so it tries the segment
/// of the last hit and its successor before searching.
pub(crate) struct SegmentCursor<'a> {
    segments: &'a [Segment],
    at: usize,
}

impl<'a> SegmentCursor<'a> {
    pub(crate) fn new(segments: &'a [Segment]) -> Self {
        SegmentCursor { segments, at: 0 }
    }

    /// The index of the segment holding `cluster`, if any.
    pub(crate) fn find(&mut self, cluster: u64) -> Option<usize> {
        let holds = |i: usize| {
            self.segments
                .get(i)
                .is_some_and(|s| s.start <= cluster && cluster < s.end)
        };
        if holds(self.at) {
            return Some(self.at);
        }
        if holds(self.at + 1) {
            self.at += 1;
            return Some(self.at);
        }
        let i = self.segments.partition_point(|s| s.end <= cluster);
        if holds(i) {
            self.at = i;
            Some(i)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The net change of one cluster, summed naively over the runs.
    fn naive(runs: &[(u64, u64, i64)], k: u64) -> i64 {
        runs.iter()
            .filter(|r| r.0 <= k && k < r.1)
            .map(|r| r.2)
            .sum()
    }

    #[test]
    fn settling_sums_overlapping_runs_per_cluster() {
        // Overlaps, touching runs, cancelling runs, out-of-order runs and a gap.
        let runs = [
            (10, 20, 1),
            (15, 25, 1),
            (20, 22, -1),
            (5, 8, 2),
            (30, 31, 1),
            (30, 31, -1),
            (8, 10, 2),
            (40, 41, 3),
            (40, 41, 3),
        ];
        let mut d = RefcountDeltas::default();
        for &(s, e, x) in &runs {
            d.add_clusters(s, e, x);
        }
        let segs = d.settle();
        for w in segs.windows(2) {
            assert!(w[0].end <= w[1].start, "disjoint and ascending: {segs:?}");
            assert!(
                w[0].end < w[1].start || w[0].delta != w[1].delta,
                "merged: {segs:?}"
            );
        }
        let mut cursor = SegmentCursor::new(&segs);
        for k in 0..50 {
            let got = cursor.find(k).map_or(0, |i| segs[i].delta);
            assert_eq!(got, naive(&runs, k), "cluster {k}");
            assert!(got != 0 || cursor.find(k).is_none(), "no zero segment");
        }
        // Backwards lookups work too.
        for k in (0..50).rev() {
            assert_eq!(cursor.find(k).map_or(0, |i| segs[i].delta), naive(&runs, k));
        }
    }

    #[test]
    fn byte_ranges_touch_every_cluster_they_cover() {
        let mut d = RefcountDeltas::default();
        // Two compressed clusters sharing host cluster 1 count it twice.
        d.add_bytes(0x1200, 0x300, 1, 12);
        d.add_bytes(0x1500, 0x1000, 1, 12);
        d.add_bytes(0x9000, 0, 1, 12);
        let segs = d.settle();
        assert_eq!(
            segs,
            vec![
                Segment {
                    start: 1,
                    end: 2,
                    delta: 2
                },
                Segment {
                    start: 2,
                    end: 3,
                    delta: 1
                },
            ]
        );
    }

    #[test]
    fn contiguous_runs_coalesce_while_collecting() {
        let mut d = RefcountDeltas::default();
        for k in 0..1000u64 {
            d.add_clusters(k, k + 1, 1);
        }
        assert_eq!(d.runs.len(), 1);
        assert_eq!(d.settle()[0].len(), 1000);
    }
}
