"""Examples as token ids with labels on what is learnt (-100 elsewhere), and the collator that pads them."""
import bisect
import sys

import torch


def tokenize_examples(examples: list[dict], tokenizer, max_length: int) -> tuple[list[dict], dict]:
    """Token ids with labels on the completion only (prompt tokens -100), EOS appended.

    Segment examples (multi-turn chat, text) are the concatenation of their segments' tokens, labelled where the
    segment is trained; text rows start with the tokenizer's special tokens (unlabelled) and end with EOS.
    Over-long examples are cut to ``max_length`` (counted); examples left with no completion token, or
    with an empty completion, are dropped (counted).

    Returns:
        (features, counts): features are {"input_ids", "labels"} lists; counts has
        "examples", "kept", "truncated", "dropped", "tokens" (kept tokens) and "label_tokens".
    """
    eos = tokenizer.eos_token_id
    pairs = [e for e in examples if "segments" not in e]
    prompts = tokenizer([e["prompt"] for e in pairs], add_special_tokens=True)["input_ids"] if pairs else []
    if any(e.get("chat") for e in pairs):  # a chat template writes its own BOS
        bare = tokenizer([e["prompt"] for e in pairs], add_special_tokens=False)["input_ids"]
        prompts = [b if e.get("chat") else p for e, p, b in zip(pairs, prompts, bare)]
    completions = tokenizer([e["completion"] for e in pairs], add_special_tokens=False)["input_ids"] if pairs else []
    tokenized = iter(zip(prompts, completions))
    segmented = iter(_tokenize_segments([e for e in examples if "segments" in e], tokenizer))
    features, counts = [], dict(examples=len(examples), kept=0, truncated=0, dropped=0, tokens=0, label_tokens=0)
    for e in examples:
        if "segments" in e:
            ids, labels = next(segmented)
            if not any(t.strip() for t, trained in e["segments"] if trained):
                counts["dropped"] += 1
                continue
        else:
            p, c = next(tokenized)
            if not e["completion"].strip():
                counts["dropped"] += 1
                continue
            if eos is not None and not (e.get("chat") and eos in c[-2:]):  # chat templates may end the turn already
                c = c + [eos]
            ids, labels = p + c, [-100] * len(p) + c
        if len(ids) > max_length:
            counts["truncated"] += 1
            ids, labels = ids[:max_length], labels[:max_length]
        n_labels = sum(1 for t in labels if t != -100)
        if n_labels == 0:
            counts["dropped"] += 1
            continue
        features.append({"input_ids": ids, "labels": labels})
        counts["kept"] += 1
        counts["tokens"] += len(ids)
        counts["label_tokens"] += n_labels
    return features, counts


def _tokenize_segments(examples: list[dict], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of segment examples: each segment tokenized on its own (chat: at the template's turn
    boundaries), labels -100 on untrained segments; EOS appended (trained) unless the last two tokens hold it."""
    if not examples:
        return []
    eos = tokenizer.eos_token_id
    texts = [t for e in examples for t, _ in e["segments"]]
    pieces = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])
    out = []
    for e in examples:
        ids, labels = [], []
        if e.get("text"):  # plain text: the tokenizer's own leading special tokens (BOS), unlabelled
            text = e["segments"][0][0]
            full, bare = tokenizer(text)["input_ids"], tokenizer(text, add_special_tokens=False)["input_ids"]
            prefix = full[:len(full) - len(bare)] if full[len(full) - len(bare):] == bare else []
            ids, labels = list(prefix), [-100] * len(prefix)
        for _, trained in e["segments"]:
            piece = next(pieces)
            ids += piece
            labels += piece if trained else [-100] * len(piece)
        if eos is not None and e["segments"][-1][1] and eos not in ids[-2:]:
            ids, labels = ids + [eos], labels + [eos]
        out.append((ids, labels))
    return out


def describe_counts(counts: dict, max_length: int) -> str:
    return (f"{counts['kept']} of {counts['examples']} examples kept ({counts['tokens']} tokens, "
            f"{counts['label_tokens']} answer tokens); {counts['truncated']} truncated to max_length={max_length}; "
            f"{counts['dropped']} dropped (no answer token left)")


class Collator:
    """Right-pads a batch: input_ids with the pad token, labels with -100, attention_mask 0 on padding."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        length = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            length = -(-length // self.multiple) * self.multiple
        input_ids, labels = right_padded(features, length, self.pad_token_id)
        attention_mask = torch.zeros_like(input_ids)  # (B, T)
        for i, f in enumerate(features):
            attention_mask[i, :len(f["input_ids"])] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def right_padded(rows: list[dict], length: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), each (B, T=length): the rows' tokens, then the pad token (labels -100)."""
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
    return input_ids, labels


def pack_features(features: list[dict], max_length: int) -> tuple[list[dict], dict]:
    """Whole examples packed into blocks of at most ``max_length`` tokens, best-fit decreasing.

    Each block keeps its examples' lengths (``lengths``), from which ``PackedCollator`` restarts the position ids
    per example, so attention never crosses an example boundary. The first token of every example is unlabelled:
    in an unpacked row nothing predicts it, and in a block the previous example's last token must not.
    Best-fit decreasing (longest first, into the fullest block it fits) fills blocks well and is deterministic;
    the Trainer shuffles the blocks.

    Returns:
        (blocks, stats): blocks are {"input_ids", "labels", "lengths"}; stats has "examples", "blocks" and
        "fill" (tokens / (blocks · max_length)).
    """
    order = sorted(range(len(features)), key=lambda i: (-len(features[i]["input_ids"]), i))
    room, members = [], []  # room[b]: free tokens of block b
    by_room: list[tuple[int, int]] = []  # sorted (room, block)
    for i in order:
        n = len(features[i]["input_ids"])
        j = bisect.bisect_left(by_room, (n, -1))  # the fullest block with room for n
        if j == len(by_room):
            room.append(max_length)
            members.append([])
            b = len(room) - 1
        else:
            b = by_room.pop(j)[1]
        room[b] -= n
        members[b].append(i)
        bisect.insort(by_room, (room[b], b))
    blocks = [_block([features[i] for i in sorted(m)]) for m in members]
    tokens = sum(len(f["input_ids"]) for f in features)
    return blocks, dict(examples=len(features), blocks=len(blocks),
                        fill=tokens / max(len(blocks) * max_length, 1))


def _block(examples: list[dict]) -> dict:
    ids, labels = [], []
    for e in examples:
        ids += e["input_ids"]
        labels += [-100] + list(e["labels"][1:])
    return {"input_ids": ids, "labels": labels, "lengths": [len(e["input_ids"]) for e in examples]}


class PackedCollator:
    """Right-pads a batch of packed blocks, with ``position_ids`` restarting at 0 for every example and no
    ``attention_mask``: transformers then reads the example boundaries from the position ids and masks attention
    across them (``masking_utils.find_packed_sequence_indices``). Padding is its own sequence at the end of a row,
    unlabelled. ``token_count`` (B,) holds the real tokens per row, for the tokens/s count (popped before the
    model sees the batch)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, blocks: list[dict]) -> dict:
        length = max(len(b["input_ids"]) for b in blocks)
        input_ids, labels = right_padded(blocks, length, self.pad_token_id)
        position_ids = torch.zeros_like(input_ids)  # (B, T)
        for i, b in enumerate(blocks):
            rest = length - len(b["input_ids"])
            position_ids[i] = torch.cat([torch.arange(k) for k in b["lengths"] + [rest] if k])
        token_count = torch.tensor([len(b["input_ids"]) for b in blocks])
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "token_count": token_count}


PACKING_ATTENTION = ("sdpa", "eager", "flex_attention")  # masked from position ids for any batch size


def packing_problem(model) -> str | None:
    """Why ``model`` cannot train on packed rows, or None: its attention must take the example boundaries from
    the position ids (transformers' ``create_causal_mask`` does, for sdpa, eager and flex attention; its flash
    attention path does so only for a batch of one flattened row)."""
    attn = getattr(model.config, "_attn_implementation", None) or "eager"
    module = sys.modules.get(type(model).__module__)
    if not hasattr(module, "create_causal_mask"):
        return (f"packing: true needs transformers' packed-sequence masking, which {type(model).__name__} does not "
                "use; set packing: false")
    if attn not in PACKING_ATTENTION:
        return (f"packing: true is not supported with attn_implementation={attn!r} (transformers masks packed "
                f"rows for {', '.join(PACKING_ATTENTION)}); load the model with sdpa, or set packing: false")
    return None
