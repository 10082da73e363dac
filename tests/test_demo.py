"""The main job, in a short version."""
from nanoblock import demo


def test_demo_runs_and_curves_agree(capsys):
    result = demo.main(["--steps", "40", "--batch-size", "16", "--n-embd", "32",
                        "--n-head", "2", "--eval-size", "20"])
    nb, ref = result["nanoblock_losses"], result["reference_losses"]
    assert len(nb) == len(ref) == 40
    assert nb[-1] < 0.8 * nb[0]  # it learns
    # same start, same batches: the two curves agree step by step
    assert max(abs(a - b) for a, b in zip(nb, ref)) < 1e-3
    out = capsys.readouterr().out
    assert "speed-up" in out and "sorted exactly" in out
