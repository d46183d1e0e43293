//! Hub ids: resolution through a Hugging Face cache tree laid out as `huggingface_hub`
//! lays it out (real symlinks into `blobs/`), offline refusal, and downloads from a
//! local HTTP server on loopback that answers like the hub (API, `resolve/` URLs with
//! ETags, LFS redirects to a CDN, a gated repo).

use crate::common::*;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use weightdiff::synthetic::{build_pair, demo_spec};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A content hash standing in for the hub's ETag (64 hex digits, like a SHA-256).
fn etag(bytes: &[u8]) -> String {
    let mut out = String::new();
    for seed in 0..4u64 {
        let mut h = 0xcbf29ce484222325u64 ^ seed;
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
        out.push_str(&format!("{h:016x}"));
    }
    out
}

/// The files of a model directory, by relative name.
fn files_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_str().unwrap().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

/// Puts `files` into `cache` as huggingface_hub does: blobs named by ETag, a snapshot
/// of relative symlinks, and `refs/REVISION`.
fn cache_repo(cache: &Path, repo: &str, revision: &str, files: &BTreeMap<String, Vec<u8>>) {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snap = root.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(root.join("refs")).unwrap();
    for (name, bytes) in files {
        let tag = etag(bytes);
        std::fs::write(root.join("blobs").join(&tag), bytes).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{tag}"), snap.join(name)).unwrap();
    }
    std::fs::write(root.join("refs").join(revision), COMMIT).unwrap();
}

/// `weightdiff` with a clean Hugging Face environment.
fn wd(cache: &Path) -> assert_cmd::Command {
    let mut c = weightdiff();
    for k in [
        "HF_HOME",
        "HF_HUB_OFFLINE",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_ENDPOINT",
        "XDG_CACHE_HOME",
    ] {
        c.env_remove(k);
    }
    c.env("HF_HUB_CACHE", cache);
    c
}

fn metrics(out: &Path) -> serde_json::Value {
    metrics_without_times(&read_json(&out.join("weight_differences.json")))
}

#[test]
fn hub_id_resolves_through_the_cache_offline() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let cache = dir.path().join("cache");
    cache_repo(&cache, "acme/tiny-base", "main", &files_of(&pair.base));
    let snap = cache.join("models--acme--tiny-base/snapshots").join(COMMIT);
    assert!(snap.join("config.json").is_symlink());

    let direct = dir.path().join("direct");
    compare_cli(&direct, &pair.base, &pair.finetuned)
        .assert()
        .success();
    for (arg, n) in [
        ("acme/tiny-base".to_string(), 1),
        ("acme/tiny-base@main".to_string(), 2),
        (format!("acme/tiny-base@{COMMIT}"), 3),
    ] {
        let out = dir.path().join(format!("via-hub-{n}"));
        wd(&cache)
            .env("HF_HUB_OFFLINE", "1")
            .args(["compare", "--quiet", "-o"])
            .arg(&out)
            .arg(&arg)
            .arg(&pair.finetuned)
            .assert()
            .success();
        assert_eq!(metrics(&out), metrics(&direct), "{arg}");
        let wdj = read_json(&out.join("weight_differences.json"));
        assert_eq!(wdj["hub"]["base"]["commit"], COMMIT);
        assert_eq!(wdj["hub"]["base"]["repo_id"], "acme/tiny-base");
        let cfg = read_json(&out.join("lora_adapter/adapter_config.json"));
        assert_eq!(cfg["base_model_name_or_path"], "acme/tiny-base");
        assert_eq!(cfg["revision"], COMMIT);
    }
    // $HF_HOME/hub is the cache when HF_HUB_CACHE is not set.
    let home = dir.path().join("hf-home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::rename(&cache, home.join("hub")).unwrap();
    let mut c = wd(Path::new("/nonexistent"));
    c.env_remove("HF_HUB_CACHE")
        .env("HF_HOME", &home)
        .env("HF_HUB_OFFLINE", "1")
        .args(["inspect", "--json", "acme/tiny-base"])
        .assert()
        .success();
}

#[test]
fn offline_and_not_cached_says_what_to_run() {
    let dir = tempfile::tempdir().unwrap();
    wd(dir.path())
        .env("HF_HUB_OFFLINE", "1")
        .args(["inspect", "acme/absent"])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("acme/absent"))
        .stderr(predicates::str::contains("HF_HUB_OFFLINE"))
        .stderr(predicates::str::contains(
            "hf download acme/absent --include",
        ));
    wd(dir.path())
        .env("HF_HUB_OFFLINE", "1")
        .args(["inspect", "acme/absent@v2"])
        .assert()
        .code(2)
        .stderr(predicates::str::contains(
            "hf download acme/absent --revision v2",
        ));
    // A half-downloaded snapshot (index present, a shard missing) is not used.
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let mut files = files_of(&pair.base);
    let shard = files
        .keys()
        .find(|k| k.ends_with(".safetensors"))
        .unwrap()
        .clone();
    files.remove(&shard);
    cache_repo(dir.path(), "acme/partial", "main", &files);
    wd(dir.path())
        .env("HF_HUB_OFFLINE", "1")
        .args(["inspect", "acme/partial"])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("HF_HUB_OFFLINE"));
}

/// A loopback server answering like the hub for one repo.
struct FakeHub {
    url: String,
    /// "METHOD PATH auth=yes|no" per request.
    log: Arc<Mutex<Vec<String>>>,
}

fn fake_hub(
    repo: &'static str,
    files: BTreeMap<String, Vec<u8>>,
    token: Option<&'static str>,
) -> FakeHub {
    // The hub on 127.0.0.1 and its CDN on 127.0.0.2 (another host, as in production:
    // clients follow only the redirect of an LFS file's content there).
    let hub = TcpListener::bind("127.0.0.1:0").unwrap();
    let cdn = TcpListener::bind("127.0.0.2:0").unwrap();
    let url = format!("http://{}", hub.local_addr().unwrap());
    let cdn_url = format!("http://{}", cdn.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let files = Arc::new(files);
    for listener in [hub, cdn] {
        let (log, files, cdn_url) = (log.clone(), files.clone(), cdn_url.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                serve(stream, repo, &files, &cdn_url, token, &log);
            }
        });
    }
    FakeHub { url, log }
}

/// Answers one HTTP/1.1 request (`Connection: close`) and logs it.
fn serve(
    mut stream: std::net::TcpStream,
    repo: &str,
    files: &BTreeMap<String, Vec<u8>>,
    cdn_url: &str,
    token: Option<&str>,
    log: &Mutex<Vec<String>>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() || line.is_empty() {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("");
    let path = path.split('?').next().unwrap_or("").to_string();
    let mut auth = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("authorization")
        {
            auth = Some(v.trim().to_string());
        }
    }
    log.lock().unwrap().push(format!(
        "{method} {path} auth={}",
        if auth.is_some() { "yes" } else { "no" }
    ));
    let authorized = token.is_none_or(|t| auth.as_deref() == Some(&format!("Bearer {t}")));
    let (status, headers, body) = respond(repo, files, cdn_url, &path, authorized);
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !head.contains("Content-Length") {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    if method != "HEAD" {
        let _ = stream.write_all(&body);
    }
    let _ = stream.flush();
    let _ = reader.read(&mut [0u8; 0]);
}

type Reply = (&'static str, Vec<(String, String)>, Vec<u8>);

fn respond(
    repo: &str,
    files: &BTreeMap<String, Vec<u8>>,
    cdn_url: &str,
    path: &str,
    authorized: bool,
) -> Reply {
    let not_found: Reply = ("404 Not Found", vec![], b"not found".to_vec());
    if let Some(tag) = path.strip_prefix("/cdn/") {
        // The CDN: signed URLs, no token needed.
        return match files.values().find(|b| etag(b) == tag) {
            Some(b) => ("200 OK", vec![], b.clone()),
            None => not_found,
        };
    }
    if !authorized {
        return ("401 Unauthorized", vec![], b"gated".to_vec());
    }
    if path == format!("/api/models/{repo}/revision/main") {
        let mut siblings: Vec<serde_json::Value> = files
            .keys()
            .map(|k| serde_json::json!({"rfilename": k}))
            .collect();
        // Files a comparison must not fetch.
        for extra in [
            "README.md",
            "original/consolidated.00.pth",
            "pytorch_model.bin",
        ] {
            siblings.push(serde_json::json!({"rfilename": extra}));
        }
        let body = serde_json::json!({"id": repo, "sha": COMMIT, "siblings": siblings});
        return ("200 OK", vec![], body.to_string().into_bytes());
    }
    if path == format!("/api/models/{repo}/tree/{COMMIT}") {
        // huggingface_hub's snapshot_download lists files this way.
        let entries: Vec<serde_json::Value> = files
            .iter()
            .map(|(k, b)| serde_json::json!({"type": "file", "path": k, "size": b.len(), "oid": etag(b)}))
            .collect();
        return (
            "200 OK",
            vec![],
            serde_json::Value::from(entries).to_string().into_bytes(),
        );
    }
    if let Some(name) = path.strip_prefix(&format!("/api/resolve-cache/models/{repo}/{COMMIT}/")) {
        // Where the hub sends small files now: a relative redirect within the hub.
        return match files.get(name) {
            Some(bytes) => (
                "200 OK",
                vec![
                    ("ETag".to_string(), format!("\"{}\"", etag(bytes))),
                    ("X-Repo-Commit".to_string(), COMMIT.to_string()),
                ],
                bytes.clone(),
            ),
            None => not_found,
        };
    }
    let Some(name) = path.strip_prefix(&format!("/{repo}/resolve/{COMMIT}/")) else {
        return not_found;
    };
    let Some(bytes) = files.get(name) else {
        return not_found;
    };
    let tag = etag(bytes);
    if name.ends_with(".safetensors") {
        // LFS: the hub redirects to the CDN and names the blob in X-Linked-* headers.
        let headers = vec![
            // Absolute, as the hub's (a CDN host): clients follow it for the content
            // and read the X-Linked-* headers of this response for the blob.
            ("Location".to_string(), format!("{cdn_url}/cdn/{tag}")),
            ("X-Linked-Etag".to_string(), format!("\"{tag}\"")),
            ("X-Linked-Size".to_string(), bytes.len().to_string()),
            ("X-Repo-Commit".to_string(), COMMIT.to_string()),
        ];
        return ("302 Found", headers, Vec::new());
    }
    if name == "config.json" {
        return (
            "307 Temporary Redirect",
            vec![
                (
                    "Location".to_string(),
                    format!("/api/resolve-cache/models/{repo}/{COMMIT}/{name}"),
                ),
                ("X-Repo-Commit".to_string(), COMMIT.to_string()),
            ],
            Vec::new(),
        );
    }
    (
        "200 OK",
        vec![
            ("ETag".to_string(), format!("\"{tag}\"")),
            ("X-Repo-Commit".to_string(), COMMIT.to_string()),
        ],
        bytes.clone(),
    )
}

#[test]
fn missing_models_are_downloaded_into_the_cache_layout() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let files = files_of(&pair.base);
    let hub = fake_hub("acme/tiny-base", files.clone(), None);
    let cache = dir.path().join("cache");
    let out = dir.path().join("out");
    let run = |out: &Path| {
        wd(&cache)
            .env("HF_ENDPOINT", &hub.url)
            .args(["compare", "--quiet", "-o"])
            .arg(out)
            .arg("acme/tiny-base")
            .arg(&pair.finetuned)
            .assert()
            .success();
    };
    run(&out);
    let direct = dir.path().join("direct");
    compare_cli(&direct, &pair.base, &pair.finetuned)
        .assert()
        .success();
    assert_eq!(metrics(&out), metrics(&direct));

    // huggingface_hub's layout: refs/main, relative symlinks into blobs/ named by ETag.
    let root = cache.join("models--acme--tiny-base");
    assert_eq!(
        std::fs::read_to_string(root.join("refs/main")).unwrap(),
        COMMIT
    );
    let snap = root.join("snapshots").join(COMMIT);
    for (name, bytes) in &files {
        let link = snap.join(name);
        assert!(link.is_symlink(), "{name} is not a symlink");
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            PathBuf::from(format!("../../blobs/{}", etag(bytes)))
        );
        assert_eq!(&std::fs::read(&link).unwrap(), bytes);
    }
    // blobs/ holds the files and nothing else (locks go to CACHE/.locks/, as
    // huggingface_hub keeps them).
    let mut blobs: Vec<String> = std::fs::read_dir(root.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    blobs.sort();
    let mut tags: Vec<String> = files.values().map(|b| etag(b)).collect();
    tags.sort();
    tags.dedup();
    assert_eq!(blobs, tags);
    assert!(cache.join(".locks/models--acme--tiny-base").is_dir());
    let log = hub.log.lock().unwrap().clone();
    let fetched: Vec<&String> = log.iter().filter(|l| l.starts_with("GET ")).collect();
    let shards = files.keys().filter(|k| k.ends_with(".safetensors")).count();
    assert_eq!(
        fetched
            .iter()
            .filter(|l| l.starts_with("GET /cdn/"))
            .count(),
        shards,
        "each shard fetched once from the CDN: {fetched:?}"
    );
    for never in ["README.md", "original/", "pytorch_model.bin"] {
        assert!(
            !fetched.iter().any(|l| l.contains(never)),
            "{never} was downloaded: {fetched:?}"
        );
    }
    assert!(
        log.iter()
            .all(|l| !l.starts_with("GET /cdn/") || l.ends_with("auth=no")),
        "the CDN got a token"
    );
    // Second run: everything is cached, nothing is asked of the hub.
    let before = log.len();
    run(&dir.path().join("out2"));
    assert_eq!(hub.log.lock().unwrap().len(), before);
}

#[test]
fn gated_repos_need_hf_token() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let hub = fake_hub("acme/gated", files_of(&pair.base), Some("s3cret"));
    let cache = dir.path().join("cache");
    wd(&cache)
        .env("HF_ENDPOINT", &hub.url)
        .args(["inspect", "acme/gated"])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("HF_TOKEN"));
    wd(&cache)
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_TOKEN", "wrong")
        .args(["inspect", "acme/gated"])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("401"));
    let out = wd(&cache)
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_TOKEN", "s3cret")
        .args(["inspect", "--json", "acme/gated"])
        .output()
        .unwrap();
    let v = stdout_json(&out);
    assert_eq!(v["tensors"].as_array().unwrap().len(), 25);
    // The token follows the hub's own redirect (config.json -> resolve-cache), never the
    // CDN's.
    let log = hub.log.lock().unwrap().clone();
    assert!(
        log.iter()
            .any(|l| l.starts_with("GET /api/resolve-cache/") && l.ends_with("auth=yes")),
        "{log:?}"
    );
    assert!(
        log.iter()
            .filter(|l| l.contains("/cdn/"))
            .all(|l| l.ends_with("auth=no"))
    );
}

#[test]
fn an_unreachable_hub_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    wd(dir.path())
        .env("HF_ENDPOINT", format!("http://127.0.0.1:{port}"))
        .args(["inspect", "acme/tiny-base"])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("cannot reach"))
        .stderr(predicates::str::contains("HF_HUB_OFFLINE=1"));
}

#[test]
fn concurrent_runs_download_each_blob_once() {
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let files = files_of(&pair.base);
    let hub = fake_hub("acme/tiny-base", files.clone(), None);
    let cache = dir.path().join("cache");
    let bin = assert_cmd::cargo::cargo_bin("weightdiff");
    // Three SLURM-like tasks given the same hub id at once.
    let children: Vec<_> = (0..3)
        .map(|_| {
            std::process::Command::new(&bin)
                .args(["inspect", "--json", "acme/tiny-base"])
                .env("HF_HUB_CACHE", &cache)
                .env("HF_ENDPOINT", &hub.url)
                .env_remove("HF_HUB_OFFLINE")
                .env_remove("HF_TOKEN")
                .env_remove("HF_HOME")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let v = stdout_json(&c.wait_with_output().unwrap());
        assert_eq!(v["tensors"].as_array().unwrap().len(), 25);
    }
    let log = hub.log.lock().unwrap().clone();
    let shards = files.keys().filter(|k| k.ends_with(".safetensors")).count();
    assert_eq!(
        log.iter().filter(|l| l.starts_with("GET /cdn/")).count(),
        shards,
        "each blob downloaded once: {log:?}"
    );
    let blobs = cache.join("models--acme--tiny-base/blobs");
    let leftovers: Vec<_> = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".incomplete"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn huggingface_hub_and_weightdiff_share_one_cache() {
    if !crate::interop::python_has("huggingface_hub") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = build_pair(&demo_spec(), &dir.path().join("pair")).unwrap();
    let files = files_of(&pair.base);
    let hub = fake_hub("acme/tiny-base", files.clone(), None);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/check_hub_cache.py"
    );
    let python = |args: &[&std::ffi::OsStr]| {
        let out = crate::interop::python()
            .arg(script)
            .args(args)
            .env_remove("HF_TOKEN")
            .env_remove("HF_HOME")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };

    // huggingface_hub downloads; weightdiff finds the model offline.
    let py_cache = dir.path().join("py-cache");
    python(&[
        "download".as_ref(),
        hub.url.as_ref(),
        py_cache.as_os_str(),
        "acme/tiny-base".as_ref(),
    ]);
    wd(&py_cache)
        .env("HF_HUB_OFFLINE", "1")
        .args(["inspect", "--json", "acme/tiny-base"])
        .assert()
        .success();

    // weightdiff downloads; huggingface_hub finds every file offline.
    let wd_cache = dir.path().join("wd-cache");
    wd(&wd_cache)
        .env("HF_ENDPOINT", &hub.url)
        .args(["inspect", "--json", "acme/tiny-base"])
        .assert()
        .success();
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "check".as_ref(),
        wd_cache.as_os_str(),
        "acme/tiny-base".as_ref(),
        COMMIT.as_ref(),
    ];
    args.extend(files.keys().map(std::ffi::OsStr::new));
    python(&args);
}

#[test]
fn one_gguf_file_of_a_repo_is_named_after_a_colon_and_only_it_is_downloaded() {
    if !crate::interop::python_has("numpy, safetensors, gguf") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/gguf_fixtures.py");
    let out = crate::interop::python()
        .arg(script)
        .arg("models")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let q8 = std::fs::read(dir.path().join("llama_q8.gguf")).unwrap();
    let other = std::fs::read(dir.path().join("llama.gguf")).unwrap();
    let files = BTreeMap::from([
        ("README.md".to_string(), b"# quants".to_vec()),
        ("llama-Q8_0.gguf".to_string(), q8),
        ("llama-F32.gguf".to_string(), other),
    ]);
    let hub = fake_hub("acme/llama-GGUF", files, None);
    let cache = dir.path().join("cache");
    wd(&cache)
        .env("HF_ENDPOINT", &hub.url)
        .args(["compare", "--quiet", "--no-lora", "-o"])
        .arg(dir.path().join("out"))
        .arg(dir.path().join("llama_q8.safetensors"))
        .arg("acme/llama-GGUF:llama-Q8_0.gguf")
        .assert()
        .success();
    let wd_json = read_json(&dir.path().join("out/weight_differences.json"));
    assert_eq!(wd_json["finetuned"], "acme/llama-GGUF:llama-Q8_0.gguf");
    assert_eq!(wd_json["quantization"][0]["storage"], "Q8_0");
    let log = hub.log.lock().unwrap().clone();
    let got: Vec<&String> = log.iter().filter(|l| l.starts_with("GET ")).collect();
    assert!(got.iter().any(|l| l.contains("llama-Q8_0.gguf")), "{got:?}");
    for never in ["llama-F32.gguf", "README.md"] {
        assert!(!got.iter().any(|l| l.contains(never)), "{never}: {got:?}");
    }
    // Without a file: the error lists the repo's GGUF files and says how to name one.
    wd(&cache)
        .env("HF_ENDPOINT", &hub.url)
        .args(["compare", "--quiet", "--no-lora", "-o"])
        .arg(dir.path().join("out2"))
        .arg(dir.path().join("llama_q8.safetensors"))
        .arg("acme/llama-GGUF")
        .assert()
        .code(2)
        .stderr(predicates::str::contains("llama-Q8_0.gguf"))
        .stderr(predicates::str::contains("ORG/NAME:FILE.gguf"));
}
