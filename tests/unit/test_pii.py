import pytest

from llmforge.config import PiiConfig, PiiPattern
from llmforge.data.pii import PiiMasker, luhn_ok, valid_card, valid_cn_id


def make_id(body17: str) -> str:
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return body17 + "10X98765432"[sum(int(d) * w for d, w in zip(body17, weights)) % 11]


VALID_ID = make_id("11010519491231002")  # check character X
VALID_ID_DIGIT = make_id("44030419850704123")
CARD16 = "4111111111111111"  # Luhn-valid test Visa


def mask(text: str, **cfg) -> tuple[str, dict]:
    masker = PiiMasker(PiiConfig(**cfg))
    out, found = masker.mask(text)
    # the RE2 prefilters (mask_batch's path) must never skip a rule that masks something
    assert masker.mask(text, masker.candidates([text])[0]) == (out, found)
    return out, dict(found)


def test_id_checksum_and_trailing_x():
    assert VALID_ID.endswith("X")
    assert valid_cn_id(VALID_ID) and valid_cn_id(VALID_ID.lower())
    assert valid_cn_id(VALID_ID_DIGIT)
    wrong = VALID_ID_DIGIT[:-1] + str((int(VALID_ID_DIGIT[-1]) + 1) % 10)
    assert not valid_cn_id(wrong)
    assert not valid_cn_id(make_id("11010519491332002"))  # month 13: no such birth date
    assert not valid_cn_id(make_id("99010519491231002"))  # no province 99


def test_luhn():
    assert luhn_ok(CARD16) and luhn_ok("5555555555554444") and luhn_ok("378282246310005")
    assert not luhn_ok("4111111111111112")


@pytest.mark.parametrize("text,kind", [
    ("contact: alice.smith+tag@mail.example.co.uk today", "EMAIL"),
    ("联系邮箱test_user@example.com谢谢", "EMAIL"),
    (f"身份证号{VALID_ID}，请核对", "ID_CN"),
    (f"身份证号:{VALID_ID_DIGIT}。", "ID_CN"),
    (f"卡号{CARD16}已绑定", "CARD"),
    ("card 4111 1111 1111 1111 on file", "CARD"),
    ("card 4111-1111-1111-1111 on file", "CARD"),
    ("amex 3782 822463 10005 here", "CARD"),
    ("电话13812345678转", "PHONE"),
    ("手机：+86 138 1234 5678。", "PHONE"),
    ("手机 +86-138-1234-5678", "PHONE"),
    ("tel 8613812345678 ok", "PHONE"),
    ("call +1 415 555 2671 now", "PHONE"),
    ("call +44 20 7946 0958 now", "PHONE"),
    ("office (415) 555-2671.", "PHONE"),
    ("座机010-62345678", "PHONE"),
    ("server 192.168.1.20 is down", "IP"),
    ("服务器地址10.0.0.1已上线", "IP"),
    ("v6 2001:db8::8a2e:370:7334 and", "IP"),
    ("loopback ::1 works", "IP"),
])
def test_positives(text, kind):
    out, found = mask(text)
    assert found.get(kind) == 1, (out, found)
    assert f"<{kind}>" in out


@pytest.mark.parametrize("text", [
    "订单号 202311051234567890 已发货",          # 18 digits, not a valid ID
    "order 4111111111111112 shipped",            # 16 digits failing Luhn
    "timestamp 20231105123045 and 2023-11-05 12:30:45",
    "released version 1.2.3 and v10.2.3.4 today",
    "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "commit 5d41402abc4b2a76b9719d911017c592",
    "ISBN 978-3-16-148410-0 and 9783161484100",
    "price $1,299.99 or ¥8999.00, total 1234567.89",
    "dates 2024/01/15, 15.01.2024 and 2024年1月15日",
    "MAC 00:1a:2b:3c:4d:5e and time 12:30:45",
    "std::vector<int> and a::b",
    "range 1999-2005, ratio 3:2, version 2.10",
    "tracking number 1Z999AA10123456784",
    "随机数字123456789012345678不是身份证",
])
def test_lookalikes_survive(text):
    out, found = mask(text)
    assert found == {} and out == text, (out, found)


def test_multiple_and_types_config():
    text = f"a@b.io 13812345678 {VALID_ID} 10.1.2.3"
    out, found = mask(text)
    assert found == {"EMAIL": 1, "PHONE": 1, "ID_CN": 1, "IP": 1}
    out, found = mask(text, types=["EMAIL"])
    assert found == {"EMAIL": 1} and "13812345678" in out
    out, found = mask(text, enabled=False)
    assert found == {} and out == text


def test_extra_patterns():
    cfg = {"extra_patterns": [PiiPattern(name="EMPLOYEE", pattern=r"EMP-\d{6}")]}
    out, found = mask("badge EMP-123456 issued", **cfg)
    assert out == "badge <EMPLOYEE> issued" and found == {"EMPLOYEE": 1}


def test_card_grouping_must_look_like_a_card():
    assert valid_card("4111 1111 1111 1111")
    assert not valid_card("41 1111 1111 1111 11")


def test_pii_in_the_other_input_fields_is_masked_dropped_or_kept_by_config():
    import json

    from llmforge.data.pii import mask_batch
    meta = json.dumps({"email": "wang.wei@example.cn", "contact": {"phones": [13812345678, "+86 139 1234 5678"]},
                       "year": 2024, "ok": True, "note": "ordinary"})
    batch = {"text": ["plain text", "rejected: a@b.example.com"], "original": [None, None],
             "reject_reason": [None, "too_short"], "meta": [meta, meta]}
    masked = mask_batch(dict(batch), PiiMasker(PiiConfig()), "mask")
    kept = json.loads(masked["meta"][0])
    assert kept == {"email": "<EMAIL>", "contact": {"phones": ["<PHONE>", "<PHONE>"]}, "year": 2024, "ok": True,
                    "note": "ordinary"}
    assert masked["pii"][0] == "EMAIL=1,PHONE=2"
    assert masked["meta"][1] == meta  # a rejected row keeps its original fields for rejects/
    assert mask_batch(dict(batch), PiiMasker(PiiConfig()), "drop")["meta"][0] == ""
    assert mask_batch(dict(batch), PiiMasker(PiiConfig()), "keep")["meta"][0] == meta


def test_prefilters_skip_rules_only_where_they_cannot_match():
    """Random texts built from PII, look-alikes, Unicode digits, separators, Chinese and placeholders' own
    characters: masking with only the rules the RE2 prefilters let through is the same as with all of them."""
    import random

    pieces = [VALID_ID, VALID_ID_DIGIT, CARD16, "4111 1111 1111 1111", "3782 822463 10005", "13812345678",
              "+86 138 1234 5678", "+1 415 555 2671", "(415) 555-2671", "010-62345678", "(010) 62345678",
              "192.168.1.20", "2001:db8::8a2e:370:7334", "::1", "a@b.io", "x.y+z@mail.example.cn", "12:30:45",
              "1.2.3", "v10.2.3.4", "std::vector", "٣٤٥", "１３８１２３４５６７８", "0", "1", "9", "-", " ", ".",
              "+", "(", ")", ":", "@", "<", ">", "X", "电话", "号", "abc", "\n", "00", "86"]
    rng = random.Random(7)
    masker = PiiMasker(PiiConfig())
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    texts += ["".join(rng.choice("0123456789 -.:+()@x") for _ in range(rng.randint(5, 40))) for _ in range(3000)]
    masked = 0
    for text, rules in zip(texts, masker.candidates(texts)):
        full = masker.mask(text)
        assert masker.mask(text, rules) == full, text
        masked += bool(full[1])
    assert masked > 1000  # the texts do hold PII
    skipped = sum(len(masker.rules) - len(rules) for rules in masker.candidates(texts))
    assert skipped > len(texts)  # and the prefilters do skip rules
