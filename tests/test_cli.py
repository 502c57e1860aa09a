"""The command line: flops output, JSON, and clean errors for bad arguments."""

from __future__ import annotations

import json

from emanet.cli import main


def test_flops_json(capsys):
    assert main(["flops", "--json", "--backbone", "resnet18", "--stem", "standard", "--size", "65", "65"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["backbone"] == "resnet18"
    assert out["cost"]["total"]["macs"] > out["cost"]["backbone"]["macs"] > 0
    assert out["table1"][0]["part"] == "ResNet-101 backbone"


def test_flops_table_prints_paper_comparison(capsys):
    assert main(["flops"]) == 0
    out = capsys.readouterr().out
    assert "Paper Table 1" in out and "190.6" in out and "non-local" in out


def test_bad_value_is_a_message_not_a_traceback(capsys):
    assert main(["flops", "--num-bases", "0"]) == 2
    err = capsys.readouterr().err
    assert "num_bases" in err and "Traceback" not in err
