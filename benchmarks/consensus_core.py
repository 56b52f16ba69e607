"""Throughput of the consensus core alone: n validators in one process, no network.

Messages are encoded to canonical CBOR and strictly decoded at every receiver,
and every signature is verified by every validator that receives it (the
process-wide cache of verified signatures is turned off, since in production
each validator is its own process). Leaders batch ``--batch`` transactions of
``--tx-size`` bytes per block.

    python benchmarks/consensus_core.py [--validators 4] [--blocks 300] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import deque

from ehrnode import crypto
from ehrnode.consensus.core import Broadcast, CommitBlocks, ConsensusCore, CoreConfig, Send
from ehrnode.consensus.messages import decode_message, encode_message
from ehrnode.consensus.safety import MemorySafetyStore
from ehrnode.consensus.types import ValidatorSet


def run(validators: int, blocks: int, batch: int, tx_size: int) -> dict[str, float]:
    crypto.set_verify_cache(0)
    identities = [crypto.Identity.from_seed(crypto.sha256(f"bench-{i}".encode())) for i in range(validators)]
    vset = ValidatorSet("bench", tuple(i.public_key for i in identities))
    config = CoreConfig(max_block_txs=batch)
    cores = [ConsensusCore(vset, i, identities[i], MemorySafetyStore(), config=config) for i in range(validators)]
    queue: deque[tuple[int, int, bytes]] = deque()
    committed = [0] * validators
    committed_txs = 0
    # Enough transactions for every block; each validator's mempool holds them all (as after gossip).
    pending = [os.urandom(tx_size) for _ in range((blocks + 4) * batch)]

    def apply(i: int, actions: list) -> None:
        nonlocal committed_txs
        for a in actions:
            if isinstance(a, Send):
                queue.append((a.to, i, encode_message(a.message)))
            elif isinstance(a, Broadcast):
                data = encode_message(a.message)
                queue.extend((j, i, data) for j in range(validators) if j != i)
            elif isinstance(a, CommitBlocks):
                committed[i] += len(a.blocks)
                if i == 0:
                    committed_txs += sum(len(b.payload) for b in a.blocks)

    for i, core in enumerate(cores):
        apply(i, core.submit(pending, 0.0))
    started = time.perf_counter()
    for i, core in enumerate(cores):
        apply(i, core.start(0.0))
    messages = 0
    while min(committed) < blocks and queue:
        dst, src, data = queue.popleft()
        messages += 1
        now = time.perf_counter() - started
        apply(dst, cores[dst].on_message(src, decode_message(data), now))
    elapsed = time.perf_counter() - started
    height = min(committed)
    return {
        "validators": validators, "blocks": height, "batch": batch, "tx_size": tx_size,
        "seconds": round(elapsed, 3), "blocks_per_s": round(height / elapsed, 1),
        "tx_per_s": round(committed_txs / elapsed, 1), "messages_per_s": round(messages / elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--validators", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=300)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--tx-size", type=int, default=256)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.validators, args.blocks, args.batch, args.tx_size)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"consensus core, n={result['validators']}, {result['batch']} tx of {result['tx_size']} B per block, "
              f"all signatures verified by every validator")
        print(f"  {result['blocks']} blocks in {result['seconds']} s: {result['blocks_per_s']} blocks/s, "
              f"{result['tx_per_s']} tx/s, {result['messages_per_s']} messages/s (one process, one core)")


if __name__ == "__main__":
    main()
