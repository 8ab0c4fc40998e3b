"""Rare-concept priority (krea2_train.curate.concepts): the concept list, caption search, and the
images chosen first."""

import numpy as np
import pytest

from krea2_train.curate.concepts import ConceptListError, match_captions, prioritised_images, read_concepts, words


def concept_file(tmp_path, text):
    path = tmp_path / "concepts.tsv"
    path.write_text(text)
    return path


def test_a_concept_list_reads_names_and_weights_and_refuses_bad_lines(tmp_path):
    concepts = read_concepts(concept_file(tmp_path, "# PageRank of a toy graph\nMamenchisaurus\t0.5\n\nNew York City\ncat\t2e-3\n"))
    assert concepts.names == ("Mamenchisaurus", "New York City", "cat")
    assert concepts.weights.tolist() == [0.5, 1.0, 0.002] and concepts.max_words == 3
    assert concepts.index[("new", "york", "city")] == 1 and len(concepts) == 3
    assert read_concepts(concept_file(tmp_path, "cat\n")).sha256 != read_concepts(concept_file(tmp_path, "cat\t2\n")).sha256

    bad = {
        "line 2: weight 'high' is not a positive number": "cat\ndog\thigh\n",
        "line 1: weight '-1' is not a positive number": "cat\t-1\n",
        "line 1: weight 'nan' is not a positive number": "cat\tnan\n",
        "line 1: '...' has no word": "...\n",
        "line 1: 'a b c d e f g h i' has 9 words, at most 8": "a b c d e f g h i\n",
    }
    for message, text in bad.items():
        with pytest.raises(ConceptListError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            read_concepts(concept_file(tmp_path, text))
    # the same words twice: one concept, the larger weight
    merged = read_concepts(concept_file(tmp_path, "New York\t0.2\ncat\nnew-york\t0.7\nNEW YORK\t0.1\n"))
    assert merged.names == ("New York", "cat") and merged.weights.tolist() == [0.7, 1.0]
    # weights after a space are words of the name: refused when most concepts end in one and no line has a tab
    with pytest.raises(ConceptListError, match="2 of its 3 concepts end in a decimal number and no line has a tab"):
        read_concepts(concept_file(tmp_path, "Mamenchisaurus 0.003\ncat 2e-3\nApollo 11\n"))
    assert read_concepts(concept_file(tmp_path, "Apollo 11\nWindows 3.1\ncat\n")).names[1] == "Windows 3.1"  # 1 of 3
    with pytest.raises(ConceptListError, match="names no concept"):
        read_concepts(concept_file(tmp_path, "# nothing\n\n"))
    with pytest.raises(ConceptListError, match="No such file"):
        read_concepts(tmp_path / "missing.tsv")


def test_captions_name_concepts_as_whole_words_once_each(tmp_path):
    concepts = read_concepts(concept_file(tmp_path, "cat\nNew York City\nMamenchisaurus\nsão paulo\n"))
    captions = [
        "A cat in a category of cats, and another CAT.",  # "cat" once; not in "category" or "cats"
        "new-york city at night, a Mamenchisaurus!",
        "York City, New Jersey",  # the words, not in order: no match
        "",
        None,  # an image without a caption names nothing
        "São Paulo, seen from a plane",
    ]
    offsets, concept_ids = match_captions(captions, concepts)
    named = [concept_ids[offsets[i] : offsets[i + 1]].tolist() for i in range(len(captions))]
    assert named == [[0], [1, 2], [], [], [], [3]]
    # overlapping concepts: every one of them, whichever is longer
    nested = read_concepts(concept_file(tmp_path, "new york city\nnew york\nyork\ncity hall\n"))
    offsets, concept_ids = match_captions(["the new york city hall", "york"], nested)
    assert concept_ids[offsets[0] : offsets[1]].tolist() == [0, 1, 2, 3] and concept_ids[offsets[1] :].tolist() == [2]
    assert words("Ünïcode_and-dashes 42") == ("ünïcode", "and", "dashes", "42")


def csr(named):
    offsets = np.concatenate([[0], np.cumsum([len(ids) for ids in named])])
    return offsets, np.asarray([i for ids in named for i in ids], dtype=np.int64)


def test_rare_important_concepts_get_their_images_first_within_the_budget():
    # concept 0 is frequent (8 images), 1 is rare (2), 2 is rare (1) but unimportant, 3 named nowhere
    named = [[0]] * 6 + [[0, 1], [0, 1], [2], [], []]
    weights = [1.0, 1.0, 0.1, 5.0]
    offsets, concept_ids = csr(named)
    everything = prioritised_images(offsets, concept_ids, weights, images_per_concept=3, budget=100, seed=0)
    # priorities: 1 (1/2) > 2 (0.1/1) > 0 (1/8). Concept 1 takes images 6 and 7, which also name 0:
    # 0 then gets only 1 more (its quota of 3 counts them); 2 gets image 8
    assert everything.concepts_found == 3 and everything.concepts_served == 3 and everything.concepts_whole == 2
    picked = everything.picked.tolist()
    assert len(picked) == 4 and {6, 7, 8} <= set(picked) and len(set(picked) & set(range(6))) == 1
    # a budget of 2 stops after the most important rare concept
    assert prioritised_images(offsets, concept_ids, weights, 3, budget=2, seed=0).picked.tolist() == [6, 7]
    assert prioritised_images(offsets, concept_ids, weights, 3, budget=0).picked.tolist() == []
    # the draw among a frequent concept's images is seeded
    one_concept = csr([[0]] * 8)
    draws = {tuple(prioritised_images(*one_concept, [1.0], 2, 100, seed=s).picked) for s in range(8)}
    assert len(draws) > 1 and all(len(d) == 2 for d in draws)
    assert prioritised_images(*one_concept, [1.0], 2, 100, seed=3).picked.tolist() == \
        prioritised_images(*one_concept, [1.0], 2, 100, seed=3).picked.tolist()
    with pytest.raises(ValueError, match="images_per_concept must be >= 1"):
        prioritised_images(offsets, concept_ids, weights, 0, 10)
