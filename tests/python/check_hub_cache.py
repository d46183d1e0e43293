"""huggingface_hub against the cache weightdiff shares with it (tests/it/hub.rs).

  check_hub_cache.py download ENDPOINT CACHE REPO
      huggingface_hub's snapshot_download of config, index and shards from ENDPOINT into
      CACHE (weightdiff must then find them offline).
  check_hub_cache.py check CACHE REPO COMMIT FILE...
      offline, huggingface_hub must find every FILE of REPO@main in CACHE (written by
      weightdiff), resolve main to COMMIT, and scan the cache without warnings.
"""
import os
import sys

from huggingface_hub import scan_cache_dir, snapshot_download, try_to_load_from_cache

mode = sys.argv[1]
if mode == "download":
    endpoint, cache, repo = sys.argv[2:5]
    path = snapshot_download(
        repo,
        cache_dir=cache,
        endpoint=endpoint,
        allow_patterns=["*.json", "*.safetensors"],
        max_workers=1,
    )
    print(path)
elif mode == "check":
    cache, repo, commit, *files = sys.argv[2:]
    for f in files:
        p = try_to_load_from_cache(repo, f, cache_dir=cache)
        assert isinstance(p, str) and os.path.isfile(p), f"{f}: {p!r}"
        assert os.path.basename(os.path.dirname(p)) == commit, p
    info = scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    (r,) = [r for r in info.repos if r.repo_id == repo]
    (rev,) = r.revisions
    assert rev.commit_hash == commit, rev.commit_hash
    assert "main" in rev.refs, rev.refs
    names = sorted(f.file_name for f in rev.files)
    assert names == sorted(files), (names, files)
    print(f"huggingface_hub reads weightdiff's cache: {len(files)} files of {repo}@{commit[:8]}")
else:
    raise SystemExit(f"unknown mode {mode}")
