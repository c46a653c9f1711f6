//! `info` against `qemu-img info` on every fixture.

mod common;

use common::*;
use qcow2_testdata::fixtures;
use serde_json::Value;

/// Compares two JSON values key by key, naming the path of the first difference.
fn assert_same_json(ours: &Value, qemu: &Value, at: &str) {
    match (ours, qemu) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                let sub = format!("{at}.{k}");
                let mine = a.get(k).unwrap_or_else(|| panic!("{sub}: missing in ours"));
                assert_same_json(mine, v, &sub);
            }
            for k in a.keys() {
                assert!(b.contains_key(k), "{at}.{k}: qemu-img has no such key");
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{at}: array lengths differ");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_same_json(x, y, &format!("{at}[{i}]"));
            }
        }
        _ => assert_eq!(ours, qemu, "{at}"),
    }
}

#[test]
fn info_json_matches_qemu_img_on_every_fixture() {
    for f in fixtures() {
        let path = path_str(&f.path);
        let ours = tool(&["info", "--output=json", "-f", fmt(f), path]);
        no_panic(&ours);
        assert_eq!(code(&ours), 0, "{}: {}", f.name, stderr(&ours));
        let ours: Value = serde_json::from_slice(&ours.stdout).expect("our JSON parses");
        let qemu = qcow2_testdata::qemu_info(&f.path);
        assert_same_json(&ours, &qemu, &f.name);
    }
}

#[test]
fn info_output_is_byte_identical_to_qemu_img() {
    for f in fixtures() {
        let path = path_str(&f.path);
        for output in ["--output=json", "--output=human"] {
            for chain in [false, true] {
                let mut args = vec!["info", output, "-f", fmt(f)];
                if chain {
                    args.push("--backing-chain");
                }
                args.push(path);
                let qemu = qemu_in(dir_of(&f.path), &args);
                assert_eq!(code(&qemu), 0, "{}", stderr(&qemu));
                let ours = tool(&args);
                assert_eq!(code(&ours), 0, "{}: {}", f.name, stderr(&ours));
                assert_eq!(stdout(&ours), stdout(&qemu), "{} {args:?}", f.name);
            }
        }
    }
}

#[test]
fn backing_chain_lists_every_image_down_to_the_raw_base() {
    let top = qcow2_testdata::fixture("chain-top");
    let out = tool(&[
        "info",
        "--output=json",
        "--backing-chain",
        path_str(&top.path),
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let formats: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["format"].as_str().unwrap())
        .collect();
    assert_eq!(formats, ["qcow2", "qcow2", "raw"]);
}

#[test]
fn info_on_a_missing_file_fails_cleanly() {
    let out = tool(&["info", "/nonexistent/x.qcow2"]);
    no_panic(&out);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("Could not open"));
}
