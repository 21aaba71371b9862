"""Peak extra resident memory and time of one SigLIP forward+backward, measured in this process.

    python tests/siglip_rss_probe.py --loss cpu materialising --rows 8192 --dim 128

``--loss``: backends of ik.siglip_loss, or "materialising" for open_clip's SigLipLoss formula
(the B x B logits and labels built), measured one after the other. Prints one JSON line per
loss: the loss, the shape, the threads, the seconds the step took and ``extra_bytes``, the peak
resident set size during the step minus the resident size just before it (inputs allocated), as
tests/rss_probe.py measures NT-Xent. The peak counter is reset through /proc/self/clear_refs;
memory a step frees may stay resident and hide part of the next step's peak, so the loss to
measure exactly comes first (a small one before a large one).
"""

import json

import torch
import torch.nn.functional as F

import infonce_kernels as ik
from rss_probe import measured_step, probe_args


def materialising_siglip(img, txt, logit_scale, logit_bias):
    """open_clip's SigLipLoss for one process: B x B logits, labels and log-sigmoids."""
    logits = logit_scale * img @ txt.T + logit_bias
    labels = 2 * torch.eye(img.shape[0], dtype=img.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / img.shape[0]


def main():
    args = probe_args(__doc__, "B, the image-text pairs",
                      loss=dict(required=True, nargs="+", help='"materialising" or backend names'))
    img = F.normalize(torch.randn(args.rows, args.dim), dim=1).requires_grad_()
    txt = F.normalize(torch.randn(args.rows, args.dim), dim=1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    for name in args.loss:
        if name == "materialising":
            loss = materialising_siglip
        else:
            def loss(*a, backend=name):
                return ik.siglip_loss(*a, backend=backend)
        # Warm up on a small batch (thread pool, BLAS buffers); the measured step is the first at full size.
        loss(img[:256], txt[:256], scale, bias).backward()
        img.grad = txt.grad = scale.grad = bias.grad = None
        seconds, extra = measured_step(lambda: loss(img, txt, scale, bias).backward())
        img.grad = txt.grad = scale.grad = bias.grad = None
        print(json.dumps({"loss": name, "rows": args.rows, "dim": args.dim, "threads": torch.get_num_threads(),
                          "seconds": seconds, "extra_bytes": extra}), flush=True)

if __name__ == "__main__":
    main()
