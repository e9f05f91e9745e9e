from bayescirc import schema


def test_method_labels_round_trip():
    label = schema.method_label("eap-ig-inputs", steps=20)
    assert label == "eap-ig-inputs:steps=20"
    assert schema.parse_method(label) == ("eap-ig-inputs", {"steps": "20"})
    assert schema.parse_method("eap") == ("eap", {})


def test_foreign_method_names_are_whole_labels():
    assert schema.parse_method("attribution patching (AtP*)") == ("attribution patching (AtP*)", {})
    assert schema.parse_method("odd:label") == ("odd:label", {})


def test_exact_is_recognised_with_parameters():
    assert schema.is_exact("exact") and schema.is_exact("exact:batch=4")
    assert not schema.is_exact("eap")
