//! `map` against `qemu-img map` on every fixture, byte for byte.

mod common;

use common::*;
use qcow2_testdata::{fixture, fixtures};

fn assert_map_matches(name: &str) {
    let f = fixture(name);
    let path = path_str(&f.path);
    for output in ["--output=json", "--output=human"] {
        let args = ["map", output, "-f", fmt(f), path];
        let qemu = qemu_in(dir_of(&f.path), &args);
        let ours = tool(&args);
        no_panic(&ours);
        assert_eq!(
            code(&ours),
            code(&qemu),
            "{name} {output}: {}",
            stderr(&ours)
        );
        assert_eq!(stdout(&ours), stdout(&qemu), "{name} {output}");
    }
}

#[test]
fn map_matches_qemu_img_on_every_fixture() {
    for f in fixtures() {
        assert_map_matches(&f.name);
    }
}

#[test]
fn map_json_parses_and_covers_the_whole_disk() {
    let f = fixture("chain-top");
    let out = tool(&["map", "--output=json", path_str(&f.path)]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let total: u64 = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(total, f.virtual_size());
}
