//! Input decoding: images, plans and their actions, read by hand from the leading bytes.

use super::*;

/// Reads little values from the front of an input; past the end every read yields zeros.
pub(crate) struct Bytes<'a>(pub(crate) &'a [u8]);

impl<'a> Bytes<'a> {
    pub(crate) fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }
    pub(crate) fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }
    pub(crate) fn u16(&mut self) -> u16 {
        (self.u8() as u16) << 8 | self.u8() as u16
    }
    pub(crate) fn u32(&mut self) -> u32 {
        (self.u16() as u32) << 16 | self.u16() as u32
    }
}

/// One image: `[shape][writes × (phase, offset, length, fill)]`. The shape byte picks the
/// virtual size (1–4 MiB), the cluster size (512, 4 KiB, 64 KiB), 0–2 snapshots, 0–3 writes and
/// whether the image has a bitmap (see [`ImageConfig::bitmap`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageConfig {
    pub shape: u8,
    pub writes: Vec<[u8; 5]>,
}

impl ImageConfig {
    pub(crate) fn read(r: &mut Bytes<'_>) -> Self {
        let shape = r.u8();
        let writes = (0..shape >> 6)
            .map(|_| {
                let mut w = [0u8; 5];
                w.copy_from_slice(&{
                    let mut b = r.take(5).to_vec();
                    b.resize(5, 0);
                    b
                });
                w
            })
            .collect();
        ImageConfig { shape, writes }
    }

    pub(crate) fn to_bytes(&self, out: &mut Vec<u8>) {
        out.push(self.shape);
        for w in &self.writes {
            out.extend_from_slice(w);
        }
    }

    pub(crate) fn size(&self) -> u64 {
        (1 + (self.shape & 3) as u64) << 20
    }

    pub(crate) fn cluster_size(&self) -> u64 {
        [512, 4096, 65536][(self.shape >> 2) as usize % 3]
    }

    pub(crate) fn snapshots(&self) -> usize {
        (self.shape >> 4) as usize % 3
    }

    /// The spare value 3 of the cluster size or the snapshot count field (which read as 512
    /// bytes and no snapshots): the image starts with an enabled bitmap `b0` that marks a write.
    pub(crate) fn bitmap(&self) -> bool {
        (self.shape >> 2) & 3 == 3 || (self.shape >> 4) & 3 == 3
    }
}

/// One action: `[kind:2 | image:3 | name:3]`; image 7 is a missing file. Kind 3 is an external
/// snapshot onto `OVERLAYS[name]` for names 0–5, and a bitmap action for names 6 (add `b1`) and
/// 7 (clear `b0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActionSel(pub u8);

impl ActionSel {
    pub(crate) fn image(self, n_images: usize) -> Option<usize> {
        let i = (self.0 >> 2) & 7;
        (i != 7).then(|| i as usize % n_images)
    }

    pub(crate) fn name(self) -> &'static str {
        NAMES[(self.0 >> 5) as usize]
    }

    pub(crate) fn overlay(self) -> &'static str {
        OVERLAYS[(self.0 >> 5) as usize % OVERLAYS.len()]
    }

    /// The bitmap action of a kind-3 selector, if it is one.
    pub(crate) fn bitmap(self) -> Option<BitmapSel> {
        match (self.0 & 3, self.0 >> 5) {
            (3, 6) => Some(BitmapSel::AddB1),
            (3, 7) => Some(BitmapSel::ClearB0),
            _ => None,
        }
    }

    pub(crate) fn action(self, n_images: usize) -> Action {
        let image = self
            .image(n_images)
            .map_or_else(|| PathBuf::from(MISSING_IMAGE), image_path);
        let name = self.name().to_string();
        match self.bitmap() {
            Some(BitmapSel::AddB1) => {
                return Action::BitmapAdd {
                    image,
                    name: "b1".into(),
                    granularity: None,
                    disabled: false,
                }
            }
            Some(BitmapSel::ClearB0) => {
                return Action::BitmapClear {
                    image,
                    name: "b0".into(),
                }
            }
            None => {}
        }
        match self.0 & 3 {
            0 => Action::InternalCreate { image, name },
            1 => Action::InternalDelete { image, name },
            2 => Action::InternalRevert { image, name },
            _ => Action::ExternalCreate {
                image,
                overlay: PathBuf::from(self.overlay()),
                mode: OverlayMode::New,
            },
        }
    }
}

/// The bitmap actions plans draw from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BitmapSel {
    AddB1,
    ClearB0,
}

pub(crate) fn image_path(i: usize) -> PathBuf {
    PathBuf::from(format!("/vm/d{i}.qcow2"))
}

/// `[n images][images][n actions][actions]`: 1–3 images, 1–4 actions (1–`max_actions`).
pub(crate) fn read_group(
    r: &mut Bytes<'_>,
    max_images: u8,
    max_actions: u8,
) -> (Vec<ImageConfig>, Vec<u8>) {
    let n = 1 + r.u8() % max_images;
    let images = (0..n).map(|_| ImageConfig::read(r)).collect();
    let a = 1 + r.u8() % max_actions;
    let actions = (0..a).map(|_| r.u8()).collect();
    (images, actions)
}

pub(crate) fn group_bytes(images: &[ImageConfig], actions: &[u8], out: &mut Vec<u8>) {
    out.push(images.len() as u8 - 1);
    for i in images {
        i.to_bytes(out);
    }
    out.push(actions.len() as u8 - 1);
    out.extend_from_slice(actions);
}

pub(crate) fn plan(images: &[ImageConfig], actions: &[u8]) -> Vec<Action> {
    actions
        .iter()
        .map(|&a| ActionSel(a).action(images.len()))
        .collect()
}
