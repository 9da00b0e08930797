"""Vocabulary parallelism: a DPO step with the LM head sharded over the vocabulary.

Each rank of the group holds a contiguous slice of the LM-head rows, in rank order (sizes may
differ). Hidden states and labels (global token ids) are the same on every rank. prefopt
combines the shards' log-sum-exps with all-reduces and takes each label's logit from the rank
that owns it, so every rank gets the same log-probs and loss; ``hidden.grad`` is the full
gradient on every rank and each rank's weight gradient stays in its slice.

Run it on two CPU processes (gloo), or on GPUs with NCCL, one process per GPU:

    torchrun --standalone --nproc-per-node 2 examples/vocab_parallel.py
    torchrun --standalone --nproc-per-node 4 examples/vocab_parallel.py --backend nccl

It then checks every rank's results against one process on the whole vocabulary and rank 0
prints them.
"""

import argparse
import os

import torch
import torch.distributed as dist

import prefopt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo",
                        help="torch.distributed backend: gloo for CPU processes, nccl for one GPU per process")
    arguments = parser.parse_args()
    if arguments.backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    dist.init_process_group(arguments.backend)
    group = dist.new_group(ranks=list(range(dist.get_world_size())))   # the ranks sharing one LM head

    # The same inputs on every rank (one seed): hidden states [2B, T, H] of the chosen and then the
    # rejected completions, their labels (already shifted, global ids), the full LM head and the
    # reference model's per-sequence log-probs.
    torch.manual_seed(0)
    pairs, length, hidden_size, vocab_size = 2, 12, 64, 1003  # uneven slices
    hidden = torch.randn(2 * pairs, length, hidden_size, device=device, requires_grad=True)
    labels = torch.randint(0, vocab_size, (2 * pairs, length), device=device)
    labels[:, :4] = -100                                            # prompt tokens are not scored
    full_lm_head_weight = torch.randn(vocab_size, hidden_size, device=device) / hidden_size**0.5
    ref_chosen_logps, ref_rejected_logps = -50 * torch.rand(2, pairs, device=device)

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    rows = torch.arange(vocab_size).tensor_split(world)[rank]      # this rank's slice [start, end)
    lm_head = torch.nn.Parameter(full_lm_head_weight[rows].clone())  # [V_rank, H]

    logps = prefopt.linear_sequence_logprobs(hidden, lm_head, labels, process_group=group)
    loss = prefopt.dpo_loss(*logps.chunk(2), ref_chosen_logps, ref_rejected_logps).loss  # same on every rank
    loss.backward()

    local_logits = hidden.detach() @ lm_head.detach().T             # [2B, T, V_rank]: this rank's logits
    token_logps = prefopt.token_logprobs(local_logits, labels, process_group=group)

    # One process on the whole vocabulary: what the sharding must not change.
    whole_hidden = hidden.detach().clone().requires_grad_(True)
    whole_weight = full_lm_head_weight.clone().requires_grad_(True)
    whole_logps = prefopt.linear_sequence_logprobs(whole_hidden, whole_weight, labels)
    whole_loss = prefopt.dpo_loss(*whole_logps.chunk(2), ref_chosen_logps, ref_rejected_logps).loss
    whole_loss.backward()
    torch.testing.assert_close(logps, whole_logps)
    torch.testing.assert_close(loss, whole_loss)
    torch.testing.assert_close(token_logps.sum(-1), whole_logps)
    torch.testing.assert_close(hidden.grad, whole_hidden.grad)
    torch.testing.assert_close(lm_head.grad, whole_weight.grad[rows.to(device)])
    if rank == 0:
        print(f"{world} ranks, vocabulary slices of {[len(r) for r in torch.arange(vocab_size).tensor_split(world)]}")
        print(f"sequence log-probs {[round(v, 3) for v in logps.tolist()]}, dpo loss {loss.item():.4f}")
        print("log-probs, loss, hidden's gradient and each rank's weight gradient match one process on the "
              "whole vocabulary")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
