"""Make torchvision importable next to CPU-only torch (checked, idempotent).

Why: PyPI has only CUDA builds of torchvision for Linux. Next to torch 2.13.0+cpu its compiled
ops (_C) fail to load, which torchvision tolerates, but torchvision 0.28's
_meta_registrations.py registers fake kernels for torchvision::nms / torchvision::qnms
unconditionally, so `import torchvision` dies with "operator torchvision::nms does not exist".
vLLM's Qwen2-VL imports transformers' torchvision-backed image processor, so torchvision must
import. This script guards those two registrations with torchvision.extension._has_ops(),
exactly like every other registration in that file already is. It is a last resort (it edits
another package's file), so it:
  - does nothing when torchvision already imports (e.g. a real CPU or CUDA build),
  - edits only the two decorator lines it expects, and refuses to touch anything else,
  - verifies the import afterwards in a fresh interpreter and exits non-zero if it still fails.
"""
import importlib.util
import re
import subprocess
import sys

PATTERN = re.compile(r'^@torch\.library\.register_fake\(("torchvision::(?:nms|qnms)")\)$', re.M)
GUARDED = r"@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))"


def imports_cleanly() -> tuple[bool, str]:
    proc = subprocess.run([sys.executable, "-c", "import torchvision.transforms.v2"],
                          capture_output=True, text=True)
    return proc.returncode == 0, proc.stderr.strip().splitlines()[-1:] and proc.stderr.strip().splitlines()[-1]


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        print("fix_torchvision: torchvision is not installed", file=sys.stderr)
        return 1
    ok, err = imports_cleanly()
    if ok:
        print("fix_torchvision: torchvision imports cleanly; nothing to do")
        return 0
    if "torchvision::nms" not in err and "torchvision::qnms" not in err:
        print(f"fix_torchvision: unexpected import error, not patching: {err}", file=sys.stderr)
        return 1
    path = spec.submodule_search_locations[0] + "/_meta_registrations.py"
    src = open(path).read()
    patched, count = PATTERN.subn(GUARDED, src)
    if count != 2:
        print(f"fix_torchvision: expected 2 unguarded registrations in {path}, found {count}",
              file=sys.stderr)
        return 1
    with open(path, "w") as f:
        f.write(patched)
    ok, err = imports_cleanly()
    if not ok:
        print(f"fix_torchvision: still failing after the patch: {err}", file=sys.stderr)
        return 1
    print(f"fix_torchvision: guarded torchvision::nms/qnms fake registrations in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
