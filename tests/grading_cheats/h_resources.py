"""Take far more memory than the grader allows, after defining a (wrong) answer."""


def verify_tokens(drafts, q, p, generator):
    return [0]


import torch  # noqa: E402

hog = torch.ones(1 << 36, dtype=torch.uint8)   # 64 GiB
