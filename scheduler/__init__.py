"""Host-side scheduling: requests, page allocation, admission policies. Imports no JAX.

The engine calls `Scheduler.schedule()` once per step and gets back a plain `StepPlan`
(sequence ids, token ranges, page tables); only the runner in `jaxserve` turns it into arrays.
The same scheduler code drives the fairness simulator.
"""
from scheduler.adapter_cache import AdapterCache
from scheduler.block_allocator import BlockAllocator, OutOfPages
from scheduler.sequence import FinishReason, SamplingOptions, Sequence, SequenceStatus
from scheduler.policy import FCFSPolicy, Policy, RequestRejected
from scheduler.scheduler import Scheduler, SchedulerConfig, StepPlan
from scheduler.replicas import ReplicaPlan, ReplicaScheduler

__all__ = [
    "AdapterCache", "BlockAllocator", "OutOfPages", "FinishReason", "SamplingOptions", "Sequence", "SequenceStatus",
    "FCFSPolicy", "Policy", "RequestRejected", "Scheduler", "SchedulerConfig", "StepPlan",
    "ReplicaPlan", "ReplicaScheduler",
]
