"""Examples as token ids with labels on what is learnt (-100 elsewhere), and the collator that pads them."""
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
        batch = len(features)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((batch, length), -100, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)  # (B, T)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
