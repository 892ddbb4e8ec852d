"""Write a file larger than the grader allows, after defining a (wrong) answer."""


def ngram_draft(token_ids, min_n, max_n, k):
    return []


with open("big.bin", "wb") as f:
    for _ in range(256):
        f.write(b"x" * (1 << 20))   # 256 MiB in all
