//! The catalogue of malformed inputs: each gives a clean error naming the file (exit 2),
//! or a per-tensor error (exit 1), never a panic.

use crate::common::*;
use std::path::Path;

const GOOD_HEADER: &str = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;

fn good() -> Vec<u8> {
    raw_file(GOOD_HEADER, &[0u8; 8])
}

/// (case, file bytes, expected words in the message)
fn bad_files() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let mut huge = (200_000_000u64).to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    let mut past_end = (1000u64).to_le_bytes().to_vec();
    past_end.extend_from_slice(b"{}");
    vec![
        ("empty file", Vec::new(), "too short"),
        ("7 bytes", vec![1, 0, 0, 0, 0, 0, 0], "too short"),
        ("header length past the end", past_end, "runs past the end"),
        ("header claims more than 100 MB", huge, "exceeds"),
        (
            "header not UTF-8",
            raw_file("{\"w?\":1}", &[])
                .into_iter()
                .map(|b| if b == b'?' { 0xff } else { b })
                .collect(),
            "UTF-8",
        ),
        (
            "invalid JSON",
            raw_file("{\"w\": [", &[]),
            "not a valid safetensors header",
        ),
        (
            "unknown dtype",
            raw_file(
                r#"{"w":{"dtype":"F13","shape":[2],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            "unknown variant",
        ),
        (
            "offsets past the end",
            raw_file(
                r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                &[0; 4],
            ),
            "truncated",
        ),
        (
            "overlapping offsets",
            raw_file(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                &[0; 12],
            ),
            "invalid offset",
        ),
        (
            "gap between tensors",
            raw_file(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
                &[0; 12],
            ),
            "invalid offset",
        ),
        (
            "trailing bytes",
            raw_file(GOOD_HEADER, &[0; 12]),
            "trailing bytes",
        ),
        (
            "shape x dtype != byte length",
            raw_file(
                r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            "header",
        ),
        (
            "shape product overflows",
            raw_file(
                r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            "header",
        ),
    ]
}

fn assert_clean_failure(base: &Path, ft: &Path, code: i32, words: &str, case: &str) {
    let out = weightdiff()
        .args(["compare", "--quiet", "-o"])
        .arg(base.parent().unwrap().join("out"))
        .arg(base)
        .arg(ft)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{case}: {stderr}");
    assert!(!stderr.contains("panicked"), "{case}: {stderr}");
    assert!(
        stderr.to_lowercase().contains(&words.to_lowercase()),
        "{case}: expected `{words}` in: {stderr}"
    );
}

#[test]
fn malformed_safetensors_files_give_exit_2_and_name_the_file() {
    for (case, bytes, words) in bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.safetensors");
        std::fs::write(&bad, &bytes).unwrap();
        let ok = dir.path().join("ok.safetensors");
        std::fs::write(&ok, good()).unwrap();
        assert_clean_failure(&bad, &ok, 2, words, case);
        assert_clean_failure(&bad, &ok, 2, "bad.safetensors", case);
        // Inspect fails the same way.
        let out = weightdiff().arg("inspect").arg(&bad).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{case}");
    }
}

fn sharded_model(dir: &Path, index: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("model-00001-of-00001.safetensors"), good()).unwrap();
    std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
    dir.to_path_buf()
}

#[test]
fn bad_indexes_give_exit_2_naming_the_index() {
    let cases = [
        (
            "missing shard",
            r#"{"weight_map":{"w":"model-00002-of-00002.safetensors"}}"#,
            "does not exist",
        ),
        (
            "parent directory",
            r#"{"weight_map":{"w":"../x.safetensors"}}"#,
            "climbs out",
        ),
        (
            "absolute path",
            r#"{"weight_map":{"w":"/etc/passwd"}}"#,
            "absolute",
        ),
        ("no weight_map", r#"{"metadata":{}}"#, "weight_map"),
        ("not JSON", "{", "invalid JSON"),
    ];
    for (case, index, words) in cases {
        let dir = tempfile::tempdir().unwrap();
        let base = sharded_model(&dir.path().join("base"), index);
        let ft = write_file(
            &dir.path().join("ft.safetensors"),
            &[f32_tensor("w", &[2], &[0.0, 0.0])],
        );
        assert_clean_failure(&base, &ft, 2, words, case);
        assert_clean_failure(&base, &ft, 2, "model.safetensors.index.json", case);
    }
}

#[test]
fn a_tensor_listed_by_the_index_but_absent_from_its_shard_is_a_tensor_error() {
    let dir = tempfile::tempdir().unwrap();
    let index = r#"{"weight_map":{"w":"model-00001-of-00001.safetensors","ghost":"model-00001-of-00001.safetensors"}}"#;
    let base = sharded_model(&dir.path().join("base"), index);
    let ft = sharded_model(&dir.path().join("ft"), index);
    assert_clean_failure(&base, &ft, 1, "absent from this shard", "ghost tensor");
    // inspect names the tensor too.
    weightdiff()
        .arg("inspect")
        .arg(&base)
        .assert()
        .code(1)
        .stdout(predicates::str::contains("tensor `ghost`"))
        .stdout(predicates::str::contains("absent from this shard"));
    let wd = read_json(&dir.path().join("out/weight_differences.json"));
    assert!(
        wd["errors"]["ghost"]
            .as_str()
            .unwrap()
            .contains("model-00001-of-00001.safetensors")
    );
    assert!(
        wd["all_differences"]["w"]["identical"].as_bool().unwrap(),
        "the good tensor is still compared"
    );
}

#[test]
fn a_tensor_in_a_shard_but_not_in_the_index_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    write_file(
        &base.join("model-00001-of-00001.safetensors"),
        &[
            f32_tensor("w", &[2], &[0.0, 0.0]),
            f32_tensor("extra", &[1], &[1.0]),
        ],
    );
    write_file(
        &base.join("stray.safetensors"),
        &[f32_tensor("s", &[1], &[1.0])],
    );
    std::fs::write(
        base.join("model.safetensors.index.json"),
        r#"{"weight_map":{"w":"model-00001-of-00001.safetensors"}}"#,
    )
    .unwrap();
    let out = weightdiff().arg("inspect").arg(&base).output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("`extra` is in this shard but not in the index"),
        "{stdout}"
    );
    assert!(
        stdout.contains("stray.safetensors: not named by the index"),
        "{stdout}"
    );
    assert!(stdout.contains("tensors:    1"), "{stdout}");
}

#[test]
fn unsupported_dtype_is_a_tensor_error_and_the_rest_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let header = r#"{"c":{"dtype":"C64","shape":[1],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#;
    let bytes = raw_file(header, &[0u8; 16]);
    std::fs::write(dir.path().join("a.safetensors"), &bytes).unwrap();
    std::fs::write(dir.path().join("b.safetensors"), &bytes).unwrap();
    assert_clean_failure(
        &dir.path().join("a.safetensors"),
        &dir.path().join("b.safetensors"),
        1,
        "unsupported dtype",
        "C64",
    );
}

#[test]
fn missing_model_and_bad_flags_give_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let ok = write_file(
        &dir.path().join("ok.safetensors"),
        &[f32_tensor("w", &[2], &[0.0, 0.0])],
    );
    assert_clean_failure(&dir.path().join("nope"), &ok, 2, "nope", "missing model");
    let empty = dir.path().join("emptydir");
    std::fs::create_dir(&empty).unwrap();
    assert_clean_failure(&empty, &ok, 2, "no model.safetensors", "empty dir");
    weightdiff()
        .args(["compare", "--include", "("])
        .arg(&ok)
        .arg(&ok)
        .assert()
        .code(2)
        .stderr(predicates::str::contains("--include"));
    weightdiff()
        .args(["compare", "--threshold", "-1"])
        .arg(&ok)
        .arg(&ok)
        .assert()
        .code(2);
    weightdiff().args(["compare"]).assert().code(2);
}

#[test]
fn a_weights_file_that_is_a_symlink_loop_is_named_with_the_loop() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("loop");
    std::fs::create_dir(&model).unwrap();
    std::os::unix::fs::symlink("model.safetensors", model.join("model.safetensors")).unwrap();
    weightdiff()
        .arg("inspect")
        .arg(&model)
        .assert()
        .code(2)
        .stderr(predicates::str::contains("model.safetensors"))
        .stderr(predicates::str::contains("symbolic links"));
}

#[test]
fn inspect_json_into_a_closed_pipe_is_not_an_error() {
    // Thousands of tensors: more JSON than a pipe buffer, so the write meets EPIPE.
    let dir = tempfile::tempdir().unwrap();
    let tensors: Vec<T> = (0..5000)
        .map(|i| f32_tensor(&format!("t{i}"), &[1], &[i as f32]))
        .collect();
    let file = write_file(&dir.path().join("many.safetensors"), &tensors);
    let bin = assert_cmd::cargo::cargo_bin("weightdiff");
    // The exit status of weightdiff itself, through bash's PIPESTATUS.
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "'{}' inspect --json '{}' | head -c 20 > /dev/null; echo ${{PIPESTATUS[0]}}",
            bin.display(),
            file.display()
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
}
