"""VTC: the Virtual Token Counter fair scheduler (Sheng et al., OSDI 2024).

Each client has a counter of the service it has received (divided by its weight); admission
always takes the front request of the backlogged client with the least counter. Hooks:
  add      a client whose queue was empty is lifted to the least counter among backlogged
           clients (or, if none is backlogged, to the counter of the client that left last),
           so idle time never banks credit. LCF is this policy without the lift.
  pop      admission charges the prefill, once per request (a recomputed prefill after a
           preemption is free), plus the predicted output when a predictor is set.
  on_tokens  every output token, the first (from prefill) included, is charged exactly once;
           with a predictor only the tokens beyond the prediction are.
  on_finish  an over-predicted request is refunded.
  requeue  a preempted request returns to the front of its client's queue, without a lift.
Counters are rebased (the minimum subtracted) and idle clients forgotten after a TTL, so a
long-running server keeps small floats and bounded state.
"""
from __future__ import annotations

from scheduler.cost import DEFAULT_CACHED_TOKEN_WEIGHT, CostFunction, LinearCost, prefill_charge
from scheduler.counter_heap import ClientState, CounterHeap
from scheduler.policy import Policy
from scheduler.predict import LengthPredictor
from scheduler.sequence import FinishReason, Sequence

_PRED_KEY = "vtc_predicted_len"


class VTCPolicy(Policy):
    name = "vtc"

    def __init__(self, cost: CostFunction | None = None, weights: dict[str, float] | None = None,
                 predictor: LengthPredictor | None = None, is_lift: bool = True,
                 client_ttl_s: float = 300.0, maintenance_interval_s: float = 10.0,
                 cached_token_weight: float = DEFAULT_CACHED_TOKEN_WEIGHT):
        self.cost = cost or LinearCost()
        if not 0 <= cached_token_weight <= 1:
            raise ValueError(f"cached_token_weight must be in [0, 1], got {cached_token_weight}")
        self.cached_token_weight = cached_token_weight
        self.weights = dict(weights or {})
        for cid, w in self.weights.items():
            if not w > 0:
                raise ValueError(f"fair weight of client {cid!r} must be positive, got {w}")
        self.predictor = predictor
        self.is_lift = is_lift
        self.client_ttl_s = client_ttl_s
        self.maintenance_interval_s = maintenance_interval_s
        self.clients: dict[str, ClientState] = {}
        self.rebase_offset = 0.0      # total subtracted from every counter so far
        self._heap = CounterHeap()
        self._last_left: str | None = None
        self._num_waiting = 0
        self._num_seen = 0
        self._last_maintenance = float("-inf")

    # -- arrivals --------------------------------------------------------------------------
    def add(self, seq: Sequence, now: float) -> None:
        self._maintain(now)
        st = self._client(seq.client_id)
        st.last_active = now
        if not st.queue:
            if self.is_lift:
                self._lift(st)  # before the append: st itself must not count as backlogged
            st.queue.append(seq)
            self._heap.push(st)
        else:
            st.queue.append(seq)
        self._num_waiting += 1

    def _lift(self, st: ClientState) -> None:
        least = self._heap.top(self.clients)
        if least is not None:
            target = least.counter
        elif self._last_left is not None and self._last_left in self.clients:
            target = self.clients[self._last_left].counter
        else:
            return
        if target > st.counter:
            st.lifted += target - st.counter
            st.counter = target

    # -- admission ---------------------------------------------------------------------------
    def peek(self) -> Sequence | None:
        st = self._heap.top(self.clients)
        return st.queue[0] if st is not None else None

    def pop(self, seq: Sequence, now: float) -> None:
        st = self.clients[seq.client_id]
        if st.queue and st.queue[0] is seq:
            st.queue.popleft()
        else:
            st.queue.remove(seq)
        self._num_waiting -= 1
        st.num_running += 1
        st.last_active = now
        if not seq.is_prefill_charged:
            seq.is_prefill_charged = True
            n_p = seq.num_prompt_tokens
            # prompt tokens served from the prefix cache at the cached-token weight
            amount = prefill_charge(self.cost, n_p, seq.num_cached_tokens,
                                    self.cached_token_weight)
            st.num_input_tokens += n_p
            st.num_cached_tokens += seq.num_cached_tokens
            if self.predictor is not None:
                pred = max(0, int(self.predictor.predict(seq)))
                seq.extra[_PRED_KEY] = pred
                amount += self.cost.total(n_p, pred) - self.cost.prefill(n_p)
            self._charge(st, amount)
        if st.queue:
            self._heap.push(st)
        else:
            self._last_left = st.client_id
        self._maintain(now)

    def requeue(self, seq: Sequence) -> None:
        st = self._client(seq.client_id)
        st.num_running -= 1
        st.queue.appendleft(seq)
        self._num_waiting += 1
        self._heap.push(st)  # back in the heap; deliberately no lift: it never left

    def remove(self, seq: Sequence) -> bool:
        st = self.clients.get(seq.client_id)
        if st is None:
            return False
        try:
            st.queue.remove(seq)
        except ValueError:
            return False
        self._num_waiting -= 1
        return True

    # -- service -----------------------------------------------------------------------------
    def on_tokens(self, seqs: list[Sequence]) -> None:
        touched: dict[str, ClientState] = {}
        for seq in seqs:
            st = self._client(seq.client_id)
            st.num_output_tokens += 1
            k = seq.num_output_tokens
            if k > seq.extra.get(_PRED_KEY, 0):
                amount = self.cost.token(seq.num_prompt_tokens, k) / st.weight
                st.counter += amount
                st.charged += amount
                touched[st.client_id] = st
        for st in touched.values():
            if st.queue:
                self._heap.push(st)
        if len(self._heap) > 4 * len(self.clients) + 64:
            self._heap.rebuild(self.clients)

    def on_finish(self, seq: Sequence) -> None:
        st = self.clients.get(seq.client_id)
        if st is None:
            return
        st.num_running -= 1
        pred = seq.extra.get(_PRED_KEY)
        if pred is None:
            return
        n_p, out = seq.num_prompt_tokens, seq.num_output_tokens
        if out < pred:
            self._charge(st, -(self.cost.total(n_p, pred) - self.cost.total(n_p, out)))
            if st.queue:
                self._heap.push(st)
        if seq.finish_reason is not FinishReason.ABORT:
            self.predictor.observe(seq.client_id, out)

    def _charge(self, st: ClientState, amount: float) -> None:
        amount /= st.weight
        st.counter += amount
        st.charged += amount

    # -- bookkeeping -------------------------------------------------------------------------
    def _client(self, cid: str) -> ClientState:
        st = self.clients.get(cid)
        if st is None:
            st = ClientState(cid, self._num_seen, self.weights.get(cid, 1.0))
            self._num_seen += 1
            self.clients[cid] = st
        return st

    def _maintain(self, now: float) -> None:
        if now - self._last_maintenance < self.maintenance_interval_s:
            return
        self._last_maintenance = now
        for cid in [cid for cid, st in self.clients.items()
                    if not st.queue and st.num_running == 0 and cid != self._last_left
                    and now - st.last_active > self.client_ttl_s]:
            del self.clients[cid]
            if self.predictor is not None:
                self.predictor.forget(cid)
        self.rebase()

    def rebase(self) -> None:
        """Subtract the least counter from all; differences, hence all decisions, are kept."""
        if not self.clients:
            return
        least = min(st.counter for st in self.clients.values())
        if least == 0.0:
            return
        for st in self.clients.values():
            st.counter -= least
            st.rebased += least
        self.rebase_offset += least
        self._heap.rebuild(self.clients)

    def waiting(self):
        for st in list(self.clients.values()):
            yield from st.queue

    def __len__(self) -> int:
        return self._num_waiting

    def stats(self) -> dict:
        return {"policy": self.name, "rebase_offset": self.rebase_offset, "clients": {
            cid: {"counter": st.counter, "weight": st.weight, "num_waiting": len(st.queue),
                  "num_running": st.num_running, "input_tokens": st.num_input_tokens,
                  "cached_tokens": st.num_cached_tokens,
                  "output_tokens": st.num_output_tokens, "charged": st.charged,
                  "service": st.charged * st.weight}
            for cid, st in self.clients.items()}}
