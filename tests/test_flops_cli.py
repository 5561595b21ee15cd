"""`leanvit flops` end to end (one subprocess), and its user errors (in this process)."""
from cli_helpers import cli, cli_error, leanvit, one_line_error


def test_flops_evit_and_plain(capsys):
    r = leanvit("flops", "evit_deit_small_patch16_224", "--keep-rate", "0.7")
    assert r.returncode == 0, r.stderr
    assert "3.03 GMACs" in r.stdout and "22.05M params" in r.stdout
    rc, out, err = cli(capsys, "flops", "deit_small_patch16_224", "--keep-rate", "0.5", "--img-size", "304")
    assert rc == 0, err
    assert "4.44 GMACs" in out and "304x304" in out


def test_flops_user_errors(capsys):
    rc, err = cli_error(capsys, "flops", "evit_deit_smal_patch16_224")
    one_line_error(rc, err, "unknown model 'evit_deit_smal_patch16_224'", "evit_deit_small_patch16_224")
    one_line_error(*cli_error(capsys, "flops", "evit_deit_small_patch16_224", "--keep-rate", "1.2"),
                   "keep_rate must be in (0, 1]")
    one_line_error(*cli_error(capsys, "flops", "resnet18", "--keep-rate", "0.5"), "VisionTransformer")
