"""The LLM-Adapters data files, fetched pinned to one commit and checked against known sha256
sums, from GitHub or from a local copy of the repository (a folder, or a file:// URL).

`python data.py download` runs download() below.
"""
import hashlib
import http.client
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from data import TASKS, DataError, dataset_file
from machinery import runs

BASE_URL = ("https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/"
            "816657208af4db747803f87ba40a4c71383fed7a/")
SHA256 = {  # None: no known sum, only checked to be a JSON list
    "ft-training_set/math_data.json": "1d06633b4db748b7cfa38f2891f8d7b17b3636717b3188dd382045b94cf999a7",
    "ft-training_set/commonsense_15k.json": None,
    "dataset/SVAMP/test.json": "ffed015784f738f317c5603177861d044c4fc94e09211d78b25e96d46c656e2c",
    "dataset/AQuA/test.json": "de677f5f0139340009eb01f17c0db781b4161912cd1f4efa77292f2fcf3478ee",
    "dataset/AddSub/test.json": "62a8662b1ad40879953c4df0e61883a749d03aa3fc5e71f1cdb842b816e139ff",
    "dataset/MultiArith/test.json": "a40f426807c8a563802c2a5b66bda3bcd1eba9c099038fd1199f0dd57de5fd28",
    "dataset/SingleEq/test.json": "712b15edb851c97aab42a5de106d94008f94d917366c92537ed5400a8aacb207",
    "dataset/gsm8k/test.json": "2cc616a1e0b23ea1df29370476365cde71c4e0aa823fb06cc194c5a8a9381abe",
    "dataset/ARC-Challenge/test.json": "4a89ce368ae01a71d268d9851686738b2a0a1d84271116bab49a1dd2b48ecad7",
    "dataset/ARC-Easy/test.json": "3f32a84716ca6d57d38728bf80cc8117aecd17445c2cf29a68b571b810eb82dc",
    "dataset/boolq/test.json": "89df2397cbca81dc31adcc6f7f5b635821aa0565aafde46725b2b4bd39b4dfa9",
    "dataset/winogrande/test.json": "6946f5209e7114c65c6d04f8f644c5a061af20d730b1cfe158fff3dc44076fb9",
    "dataset/piqa/test.json": "3860d11b9b42e590b6b4bbc1643214d373ed0b0d4ac62fcc7bdceb8e044ad141",
    "dataset/social_i_qa/test.json": "71543f41127451945379d106ffedaef502f1c8770dff6d2f543aca85e3080b1d",
    "dataset/openbookqa/test.json": "8479930f7b8a26052c78250280b5465a4016ca7fc806af440d0f37e243f3099e",
}


def file_problem(path, relative):
    """What is wrong with a local copy of a repository file, or None if it is the one we want."""
    expected = SHA256[relative]
    if expected is not None:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return None if digest == expected else f"sha256 {digest[:12]}..., expected {expected[:12]}..."
    try:  # no known sum: at least make sure it is a whole JSON list, not an error page
        whole = isinstance(json.loads(path.read_text(encoding="utf-8")), list)
        return None if whole else "not a JSON list"
    except (ValueError, UnicodeDecodeError):
        return "not valid JSON"


def source_folder(base_url):
    """The local folder that base_url names (a path, or a file:// URL), or None for a server."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme in ("http", "https"):
        return None
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):  # file://host/... is another machine's file
            raise DataError(f"--base_url {base_url}: a file:// URL names a folder on this machine "
                            "(file:///path/to/LLM-Adapters): pass that, or the folder's path")
        return Path(urllib.request.url2pathname(parts.path))
    if len(parts.scheme) > 1:  # "C:" is a drive letter, not a scheme
        raise DataError(f"--base_url {base_url}: expected an http(s):// or file:// URL or a local "
                        f"folder, found the scheme {parts.scheme}://")
    return Path(base_url)


def check_folder(folder, base_url, relatives):
    """A local copy must hold every file asked for before one is copied: all or nothing."""
    if not folder.is_dir():
        raise DataError(f"--base_url {base_url}: no such folder ({folder.resolve()}): pass a clone "
                        "of the LLM-Adapters repository at commit 8166572, or a URL")
    missing = [relative for relative in relatives if not (folder / relative).is_file()]
    if missing == ["ft-training_set/commonsense_15k.json"]:  # a bundle of the math files only
        raise DataError(f"--base_url {base_url} has no {missing[0]} (nothing copied): put it "
                        "there, or pass --task math to copy the math files only")
    if missing:
        more = f" and {len(missing) - 1} more of the files asked for" if len(missing) > 1 else ""
        raise DataError(f"--base_url {base_url} has no {missing[0]}{more} (nothing copied): pass "
                        "a folder laid out as the repository is (dataset/<NAME>/test.json, "
                        "ft-training_set/...)")


def fetch(source, path, relative, timeout):
    """Copy source (a URL or a local file) to path through a temp file beside it, renamed only
    once verified."""
    new_folders = [p for p in reversed(path.parents) if not p.exists()]  # removed if this fails
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    temp = Path(temp_name)
    try:
        with os.fdopen(handle, "wb") as out:
            if isinstance(source, Path):
                with open(source, "rb") as local:
                    shutil.copyfileobj(local, out)
            else:
                read_url(source, path, timeout, out)
        problem = file_problem(temp, relative)
        if problem and isinstance(source, Path):
            raise DataError(f"{source}: not the expected file ({problem}): --base_url must be a "
                            "copy of LLM-Adapters at commit 8166572; replace the file, or leave "
                            "out --base_url to download it")
        if problem:
            raise DataError(f"{source}: the downloaded file is not the expected one ({problem}): "
                            "run again, or check that --base_url serves LLM-Adapters at commit "
                            "8166572")
        os.chmod(temp, runs.plain_file_mode())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)  # gone already if renamed; otherwise leave no half file
        for folder in reversed(new_folders):  # and no empty folders
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()


def read_url(url, path, timeout, out):
    """Write what the server sends for url into out; its problems become one line."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except urllib.error.HTTPError as e:
        raise DataError(f"{url}: HTTP {e.code} {e.reason}: check --base_url, or put the file "
                        f"there by hand at {path}") from None
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError,
            ConnectionError) as e:
        raise DataError(f"{url}: could not download ({getattr(e, 'reason', e)}): check your "
                        "network and --base_url, then run again") from None


def download(data_dir, task="all", base_url=BASE_URL, timeout=60):
    """Fetch a task's files (task: math, commonsense or all) into data_dir, from a server or a
    local copy of the repository (a folder or a file:// URL); intact files are skipped."""
    if task not in (*TASKS, "all"):
        raise DataError(f"unknown task {task!r}: expected math, commonsense or all")
    relatives = []
    for name in TASKS if task == "all" else [task]:
        train_file, datasets, _ = TASKS[name]
        relatives += [train_file, *map(dataset_file, datasets)]
    folder = source_folder(base_url)
    if folder is not None:
        check_folder(folder, base_url, relatives)
    for relative in relatives:
        path = Path(data_dir) / relative
        if path.exists() and file_problem(path, relative) is None:
            print(f"{path}: already present and intact, skipped")
            continue
        source = folder / relative if folder is not None else base_url.rstrip("/") + "/" + relative
        fetch(source, path, relative, timeout)
        print(f"{path}: {'copied' if folder is not None else 'downloaded'} from {source}")
