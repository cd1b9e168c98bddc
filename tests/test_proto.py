"""The committed generated code must match protos/ (run `make proto` after editing the .proto)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ["haoping_pb2.py", "haoping_pb2.pyi", "haoping_pb2_grpc.py"]


def test_generated_code_is_fresh(tmp_path):
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "protos"),
                    f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                    str(ROOT / "protos/haoping/v1/haoping.proto")], check=True)
    for name in GENERATED:
        fresh = (tmp_path / "haoping/v1" / name).read_text()
        committed = (ROOT / "haoping/v1" / name).read_text()
        assert fresh == committed, f"haoping/v1/{name} is stale: run `make proto`"
