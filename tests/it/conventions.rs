//! Command-line conventions: help with examples, completions, `--json` on stdout only,
//! `-v`/`-vv` logs on stderr, `NO_COLOR`.

use crate::common::*;

const SUBCOMMANDS: &[&str] = &[
    "compare",
    "extract-lora",
    "merge",
    "inspect",
    "report",
    "completions",
    "demo",
];

#[test]
fn every_subcommand_help_has_examples() {
    let top = weightdiff().arg("--help").output().unwrap();
    assert!(String::from_utf8(top.stdout).unwrap().contains("Examples:"));
    for sub in SUBCOMMANDS {
        let out = weightdiff().args([sub, "--help"]).output().unwrap();
        assert!(out.status.success(), "{sub} --help failed");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.contains("Example"),
            "`weightdiff {sub} --help` shows no example:\n{text}"
        );
        assert!(
            text.contains("weightdiff "),
            "{sub}: examples name the command"
        );
    }
}

#[test]
fn completions_are_valid_scripts_naming_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let out = weightdiff().args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "completions {shell} failed");
        let script = String::from_utf8(out.stdout).unwrap();
        for sub in SUBCOMMANDS {
            assert!(script.contains(sub), "{shell} completion lacks `{sub}`");
        }
        if shell == "bash" {
            // The script must parse: `bash -n` checks syntax without running it.
            let dir = tempfile::tempdir().unwrap();
            let f = dir.path().join("weightdiff.bash");
            std::fs::write(&f, &script).unwrap();
            let st = std::process::Command::new("bash")
                .arg("-n")
                .arg(&f)
                .status()
                .unwrap();
            assert!(st.success(), "bash completion does not parse");
        }
    }
    weightdiff()
        .args(["completions", "tcsh"])
        .assert()
        .failure()
        .code(2);
}

#[test]
fn verbosity_goes_to_stderr_and_json_stays_alone_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let out = weightdiff()
            .args(["demo", "--json", "-o"])
            .arg(dir.path())
            .args(extra)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let v = stdout_json(&out);
        assert_eq!(v["compared"], 25);
        String::from_utf8(out.stderr).unwrap()
    };
    let quiet = run(&[]);
    assert!(!quiet.contains("INFO"), "no log lines by default: {quiet}");
    let info = run(&["-v"]);
    assert!(info.contains("INFO") && info.contains("opened checkpoint"));
    assert!(!info.contains("DEBUG"));
    let debug = run(&["-vv"]);
    assert!(debug.contains("DEBUG") && debug.contains("model.layers.0.self_attn.q_proj.weight"));
}

/// Runs `weightdiff` under a pseudo-terminal (util-linux `script`), where colour is
/// allowed; returns what the terminal showed.
fn on_a_terminal(args: &str, no_color: Option<&str>) -> String {
    let bin = assert_cmd::cargo::cargo_bin("weightdiff");
    let mut c = std::process::Command::new("script");
    c.args(["-qec", &format!("{} {args}", bin.display()), "/dev/null"]);
    c.env_remove("NO_COLOR");
    if let Some(v) = no_color {
        c.env("NO_COLOR", v);
    }
    let out = c.output().expect("util-linux `script` runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn no_color_turns_off_colour_on_a_terminal() {
    let missing = "inspect /nonexistent/model";
    let coloured = on_a_terminal(missing, None);
    assert!(coloured.contains("error"), "{coloured}");
    assert!(
        coloured.contains('\x1b'),
        "a terminal gets colour: {coloured:?}"
    );
    let plain = on_a_terminal(missing, Some("1"));
    assert!(plain.contains("error:"), "{plain}");
    assert!(
        !plain.contains('\x1b'),
        "NO_COLOR=1 still coloured: {plain:?}"
    );
}

/// Runs `weightdiff ARGS` and parses stdout as exactly one JSON document.
fn json_of(args: &[&std::ffi::OsStr]) -> serde_json::Value {
    stdout_json(&weightdiff().args(args).output().unwrap())
}

#[test]
fn json_summaries_of_every_subcommand() {
    use weightdiff::synthetic::{build_pair, demo_spec};
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let (b, f) = (pair.base.as_os_str(), pair.finetuned.as_os_str());
    let out = dir.path().join("out");
    let v = json_of(&[
        "compare".as_ref(),
        "--json".as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
        b,
        f,
    ]);
    assert_eq!(v["verdict"]["kind"], "mixed");
    assert_eq!(v["verdict"]["rank"], 4);
    assert_eq!(
        (v["compared"].as_u64(), v["modified"].as_u64()),
        (Some(25), Some(8))
    );
    assert_eq!(v["top_modified"].as_array().unwrap().len(), 8);
    let outputs: Vec<&str> = v["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for name in [
        "weight_differences.json",
        "report.html",
        "lora_adapter/adapter_model.safetensors",
    ] {
        assert!(
            outputs.iter().any(|p| p.ends_with(name)),
            "{name} not listed"
        );
    }
    let v = json_of(&["report".as_ref(), "--json".as_ref(), out.as_os_str()]);
    assert_eq!(v["outputs"].as_array().unwrap().len(), 3);
    let adapter = dir.path().join("adapter");
    let v = json_of(&[
        "extract-lora".as_ref(),
        "--json".as_ref(),
        "-o".as_ref(),
        adapter.as_os_str(),
        b,
        f,
    ]);
    assert_eq!(v["modules"], 4);
    let v = json_of(&["inspect".as_ref(), "--json".as_ref(), b]);
    assert_eq!(v["tensors"].as_array().unwrap().len(), 25);
    let traj = dir.path().join("traj");
    let v = json_of(&[
        "compare".as_ref(),
        "--json".as_ref(),
        "-o".as_ref(),
        traj.as_os_str(),
        b,
        f,
        b,
    ]);
    assert_eq!(v["checkpoints"].as_array().unwrap().len(), 2);
    assert_eq!(v["checkpoints"][0]["modified"], 8);
    assert_eq!(v["checkpoints"][1]["modified"], 0);
    assert_eq!(v["overall"].as_array().unwrap().len(), 2);
    // `report` on the directory of several fine-tunes renders each of them again.
    assert_eq!(v["outputs"].as_array().unwrap().len(), 3);
    let v = json_of(&["report".as_ref(), "--json".as_ref(), traj.as_os_str()]);
    assert_eq!(v["outputs"].as_array().unwrap().len(), 7);
}
