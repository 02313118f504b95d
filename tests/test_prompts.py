import pytest

from miro_scale.evaluation.prompts import read_geneval, read_partiprompts, read_prompts


def test_reads_the_shared_prompt_sets(shared_dir):
    parti = read_partiprompts(shared_dir / "data/partiprompts/PartiPrompts.tsv")
    assert len(parti) > 1500 and parti[0].text == "bond" and parti[0].metadata["Category"] == "Abstract"
    geneval = read_geneval(shared_dir / "data/geneval/evaluation_metadata.jsonl")
    assert len(geneval) == 553 and geneval[0].metadata["tag"] == "single_object"
    assert len(read_prompts(shared_dir / "data/geneval/evaluation_metadata.jsonl", limit=5)) == 5


def test_bad_prompt_files_name_the_line(tmp_path):
    bad = tmp_path / "g.jsonl"
    bad.write_text('{"prompt": "a"}\n{"tag": "x"}\n')
    with pytest.raises(ValueError, match=r"g\.jsonl:2: no 'prompt' field"):
        read_geneval(bad)
    tsv = tmp_path / "p.tsv"
    tsv.write_text("Text\tCategory\nx\ty\n")
    with pytest.raises(ValueError, match="expected a TSV with a 'Prompt' column"):
        read_partiprompts(tsv)
