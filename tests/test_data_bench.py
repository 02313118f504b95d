"""The loader benchmark runs end to end at a tiny size (numbers are not checked)."""
import json

from miro_scale.data import bench


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "r.json"
    bench.main(["--num-samples", "16", "--resolution", "32", "--source-resolution", "48",
                "--batch-size", "8", "--workers", "0", "--threads", "1", "--no-wds", "--latent-samples", "16",
                "--latent-workers", "1", "--latent-epochs", "1", "--dali-resize-samples", "8", "--out", str(out)])
    rep = json.loads(out.read_text())
    kinds = {(r["loader"], r["device"]) for r in rep["results"]}
    assert {("pil_dataloader", "cpu"), ("latent", "cpu"), ("latent_host_fp32_pad", "cpu")} <= kinds
    assert all(r["images"] == 16 and r["images_per_cpu_s"] > 0 for r in rep["results"])
    assert rep["summary"]["latent_w1_samples_per_cpu_s"] > 0
    if ("dali", "cpu") in kinds:  # this pipeline against the previous one, at 32 px sources and at 64
        assert {r["source_resolution"] for r in rep["results"] if r["loader"] == "dali_resize_always_cubic"} == {32, 64}
        assert rep["summary"]["dali_cpu_src64_per_cpu_s_vs_cubic_always"] > 0
    for k in ("device", "versions", "date", "command", "config", "summary"):
        assert k in rep
    assert "/CPU-s" in capsys.readouterr().out
