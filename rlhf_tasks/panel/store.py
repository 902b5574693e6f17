"""The verdict store: review batches, blinded items, reviewers, assignments and verdicts.

SQLAlchemy over SQLite (the default, ``sqlite:///.rlhf/panel.db``) or PostgreSQL
(``postgresql+psycopg2://...`` in production).  Rules the schema enforces, not the
callers:

* a reviewer judges an item at most once (unique ``(item_id, reviewer)``); a second
  verdict is refused with :class:`AlreadyJudged`, so concurrent submissions lose nothing
  and count nothing twice;
* which model wrote an item (``model``) lives only here: the reviewer-facing views
  (:meth:`PanelStore.next_item`, exports) never include it;
* reviewer tokens are stored as SHA-256 hashes, never in clear; each has an expiry, and
  revoking a reviewer ends their token at once;
* a batch closes when the gate decides (:meth:`PanelStore.close_batch`): later verdicts
  are refused with :class:`BatchClosed`, and the gate reads the verdicts given before
  the close, so a retried gate decides on the same snapshot.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterable

from sqlalchemy import (Boolean, DateTime, Float, ForeignKey, Integer, String, Text,
                        UniqueConstraint, case, create_engine, event, func, or_, select)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from rlhf_tasks.errors import BadInput
from rlhf_tasks.tracking import resolve_uri

ASSIGNMENT_LEASE = timedelta(minutes=20)  # an item served to a reviewer is held this long
DEFAULT_IDLE_CAP_S = 600.0                 # a verdict's measured time counts at most this
TOKEN_DAYS = 90                            # default lifetime of a reviewer token


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class ReviewBatch(Base):
    __tablename__ = "review_batches"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    pipeline: Mapped[str] = mapped_column(String(200))
    run_id: Mapped[str] = mapped_column(String(250))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    verdicts_per_item: Mapped[int] = mapped_column(Integer)
    quality_bar: Mapped[str] = mapped_column(Text)
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # JSON list of the identities with a stake in the run (who triggered it, by name and
    # id; the approver): they may not judge its batch
    excluded: Mapped[str | None] = mapped_column(Text, nullable=True)
    # a verdict's measured time counts at most this long: idle time beyond it (a reviewer
    # who left the page open) is not expert time
    idle_cap_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # a sequential panel's plan (JSON, rlhf_tasks.panel.sequential.SequentialPlan): which
    # models the decision compares, the serving order, the policy; None: a fixed panel
    sequential: Mapped[str | None] = mapped_column(Text, nullable=True)
    __table_args__ = (UniqueConstraint("pipeline", "run_id", name="uq_batch_run"),)

    @property
    def plan(self):
        """The sequential plan, or None for a fixed panel."""
        import json

        from rlhf_tasks.panel.sequential import SequentialPlan

        return SequentialPlan.from_json(json.loads(self.sequential)) if self.sequential \
            else None

    def deadline(self, after: timedelta) -> datetime:
        """``after`` past the batch's creation, in UTC (the panel wait and the gate)."""
        return _aware(self.created_at) + after

    @property
    def excluded_reviewers(self) -> frozenset[str]:
        import json

        return frozenset(json.loads(self.excluded or "[]"))


class ReviewItem(Base):
    __tablename__ = "review_items"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # random: not guessable
    batch_id: Mapped[str] = mapped_column(ForeignKey("review_batches.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)                  # shuffled order
    prompt_index: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    response: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(100))                 # server side only
    # a sequential batch serves its decision items by their prompt's rank in the plan's
    # order (both models' answers to a prompt before the next prompt); None: not served
    serve_rank: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Reviewer(Base):
    __tablename__ = "reviewers"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    token_sha256: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    token_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                              nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Assignment(Base):
    __tablename__ = "assignments"
    item_id: Mapped[str] = mapped_column(ForeignKey("review_items.id"), primary_key=True)
    reviewer: Mapped[str] = mapped_column(String(100), primary_key=True)
    assigned_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    # when the item was first served to this reviewer, on the store's clock (a reload
    # renews the hold, not this): the start of the verdict's measured time
    served_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True,
                                                       default=func.now())


class Verdict(Base):
    __tablename__ = "verdicts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[str] = mapped_column(ForeignKey("review_items.id"), index=True)
    reviewer: Mapped[str] = mapped_column(String(100))
    passed: Mapped[bool] = mapped_column(Boolean)
    comment: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(String(20), default="web")  # web, api, import, simulated
    # the store's clock, like the batch's closed_at: verdicts and the close are ordered by
    # one clock, whatever the clocks of the review app and the gate say
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=func.now())
    # the expert's time on this verdict: measured (served to verdict, at most the batch's
    # idle cap) for the page and the API, declared for an offline import, none for a
    # simulated rater
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    __table_args__ = (UniqueConstraint("item_id", "reviewer", name="uq_verdict_item_reviewer"),)


class AlreadyJudged(Exception):
    """The reviewer has already given a verdict on this item."""


class UnknownItem(Exception):
    """No such item."""


class BatchClosed(Exception):
    """The gate has decided on this batch: it takes no more verdicts."""


class ConflictOfInterest(Exception):
    """The reviewer triggered the batch's run or approves it: they may not judge it."""


class NotServed(Exception):
    """A verdict on an item the store never served to that reviewer, or one that already
    has its k verdicts: a reviewer does not choose what they judge."""


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; they were stored in UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class BlindItem:
    """What a reviewer sees: never the model."""
    id: str
    batch_id: str
    prompt: str
    response: str
    quality_bar: str
    simulated: bool

    def as_dict(self) -> dict:
        return {"id": self.id, "batch_id": self.batch_id, "prompt": self.prompt,
                "response": self.response, "quality_bar": self.quality_bar,
                "simulated": self.simulated}


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class PanelStore:
    def __init__(self, url: str):
        self.url = resolve_uri(url)
        # what may be printed or logged: the URL with its password masked
        self.display_url = _masked(self.url)
        sqlite = self.url.startswith("sqlite")
        self.engine = create_engine(
            self.url, pool_pre_ping=True,
            connect_args={"timeout": 30, "check_same_thread": False} if sqlite else {})
        if sqlite:
            @event.listens_for(self.engine, "connect")
            def _sqlite_pragmas(dbapi_conn, _record):  # concurrent readers + one writer
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()
        Base.metadata.create_all(self.engine)
        _add_missing_columns(self.engine)
        # SQLite has no row locks: claims in this process take turns
        self._claim_lock = threading.Lock() if sqlite else contextlib.nullcontext()
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> Session:
        return self._session()

    def dispose(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "PanelStore":
        return self

    def __exit__(self, *exc) -> None:
        self.dispose()

    # -- batches ---------------------------------------------------------------------------
    def create_batch(self, *, pipeline: str, run_id: str, items: Iterable[dict],
                     verdicts_per_item: int, quality_bar: str, simulated: bool,
                     excluded: Iterable[str | None] = (),
                     idle_cap_seconds: float = DEFAULT_IDLE_CAP_S,
                     sequential: dict | None = None) -> str:
        """A blinded batch from ``items`` (``prompt_index``, ``prompt``, ``response``,
        ``model``), shuffled by the operating system's cryptographic random source (never
        the run's seed, which is logged and could replay the order); item ids are random
        too.  A batch already made for this pipeline run is returned as it is (a retried
        evaluate step must not make a second one).  ``excluded``: identities that may not
        judge it (the run's triggering user and approver).  ``sequential``: the fields of a
        :class:`~rlhf_tasks.panel.sequential.SequentialPlan` but its order, which is drawn
        here from the same random source (a random order of the prompts the decision models
        answered)."""
        import json

        from rlhf_tasks.panel.sequential import SequentialPlan

        with self.session() as s:
            found = s.scalar(select(ReviewBatch.id).where(ReviewBatch.pipeline == pipeline,
                                                          ReviewBatch.run_id == run_id))
            if found:
                return found
            batch = ReviewBatch(id=uuid.uuid4().hex, pipeline=pipeline, run_id=run_id,
                                verdicts_per_item=verdicts_per_item, quality_bar=quality_bar,
                                simulated=simulated, idle_cap_seconds=idle_cap_seconds,
                                excluded=json.dumps(sorted({e for e in excluded if e})))
            rows = list(items)
            rng = secrets.SystemRandom()
            rng.shuffle(rows)
            rank: dict[int, int] = {}
            plan = None
            if sequential is not None:
                decision = set(SequentialPlan(**{**sequential, "order": ()}).models)
                prompts = sorted({int(r["prompt_index"]) for r in rows
                                  if r["model"] == sequential["candidate"]}
                                 & {int(r["prompt_index"]) for r in rows
                                    if r["model"] == sequential["reference"]})
                if not prompts:
                    raise BadInput(f"a sequential panel compares {sequential['candidate']} "
                                   f"with {sequential['reference']}, but the batch has no "
                                   "prompt both answered", field="panel.sequential")
                rng.shuffle(prompts)
                rank = {p: i for i, p in enumerate(prompts)}
                plan = SequentialPlan(**{**sequential, "order": tuple(prompts)})
                batch.sequential = json.dumps(plan.as_json())
            s.add(batch)
            s.flush()
            s.add_all(ReviewItem(id=uuid.uuid4().hex, batch_id=batch.id, position=i,
                                 prompt_index=int(r["prompt_index"]), prompt=r["prompt"],
                                 response=r["response"], model=r["model"],
                                 serve_rank=rank.get(int(r["prompt_index"]))
                                 if plan is not None and r["model"] in decision else None)
                      for i, r in enumerate(rows))
            try:
                s.commit()
            except IntegrityError:  # another process made it at the same moment
                s.rollback()
                return s.scalar(select(ReviewBatch.id).where(ReviewBatch.pipeline == pipeline,
                                                             ReviewBatch.run_id == run_id))
            return batch.id

    def batch(self, batch_id: str) -> ReviewBatch:
        with self.session() as s:
            batch = s.get(ReviewBatch, batch_id)
        if batch is None:
            raise BadInput(f"no review batch {batch_id!r} in the panel store")
        return batch

    def close_batch(self, batch_id: str) -> datetime:
        """Close the batch to new verdicts (idempotent); returns when it closed."""
        with self.session() as s:
            batch = s.scalar(select(ReviewBatch).where(ReviewBatch.id == batch_id)
                             .with_for_update())
            if batch is None:
                raise BadInput(f"no review batch {batch_id!r} in the panel store")
            if batch.closed_at is None:
                batch.closed_at = func.now()  # the store's clock (see Verdict.created_at)
                s.commit()
                s.refresh(batch)
            return _aware(batch.closed_at)

    def batches(self) -> list[ReviewBatch]:
        with self.session() as s:
            return list(s.scalars(select(ReviewBatch).order_by(ReviewBatch.created_at.desc())))

    # -- reviewers -------------------------------------------------------------------------
    def add_reviewer(self, name: str, *, simulated: bool = False, with_token: bool = True,
                     valid_days: float = TOKEN_DAYS) -> str | None:
        """Create (or re-key, or reinstate) a reviewer, a member of the panel; returns the
        new token (shown once), valid for ``valid_days``.  ``with_token=False`` makes a
        member who signs in another way (an Airflow user id, inside Airflow)."""
        if not name or len(name) > 100:
            raise BadInput("a reviewer name is 1 to 100 characters", field="reviewer")
        if not 0 < valid_days <= 3660:
            raise BadInput("a token lives 0 to 3660 days", field="valid_days")
        token = secrets.token_urlsafe(24) if with_token else None
        with self.session() as s:
            row = s.get(Reviewer, name) or Reviewer(name=name, simulated=simulated)
            if token:
                row.token_sha256 = hash_token(token)
                row.token_expires_at = _now() + timedelta(days=valid_days)
            row.revoked_at = None
            s.add(row)
            s.commit()
        return token

    def revoke_reviewer(self, name: str) -> bool:
        """End a reviewer's membership and token now (their verdicts stay); False when
        there is no such reviewer."""
        with self.session() as s:
            row = s.get(Reviewer, name)
            if row is None:
                return False
            row.revoked_at, row.token_sha256 = _now(), None
            s.commit()
        return True

    def reviewer_for_token(self, token: str) -> str | None:
        """The reviewer a token belongs to, while it is neither expired nor revoked."""
        if not token:
            return None
        with self.session() as s:
            row = s.scalar(select(Reviewer).where(Reviewer.token_sha256 == hash_token(token)))
        if row is None or row.revoked_at is not None:
            return None
        expires = _aware(row.token_expires_at)
        if expires is not None and expires <= _now():
            return None
        return row.name

    def is_member(self, name: str) -> bool:
        """Whether ``name`` is on the panel's reviewer list (and not revoked)."""
        with self.session() as s:
            row = s.get(Reviewer, name)
        return row is not None and row.revoked_at is None

    # -- reviewing -------------------------------------------------------------------------
    def next_item(self, batch_id: str, reviewer: str) -> BlindItem | None:
        """The next item for ``reviewer``: one they have not judged and still short of its
        verdicts; the one they were last served if still open, else the item with the
        fewest verdicts and holds by others (served within the lease), in the batch's
        shuffled order.  An item whose verdicts plus live holds by others already reach k
        is not served (experts' time would go to verdicts beyond quorum); an expired hold
        frees its slot.

        Claiming is atomic: the chosen item's row is locked (PostgreSQL: ``FOR UPDATE SKIP
        LOCKED``, so concurrent reviewers pass over it to the next item; SQLite: one claim
        at a time in this process), its load is counted again under the lock, and the hold
        is committed before the lock is released."""
        batch = self.batch(batch_id)
        if reviewer in batch.excluded_reviewers:
            raise ConflictOfInterest(f"{reviewer} triggered or approves the run of batch "
                                     f"{batch_id}: they may not judge it")
        if batch.closed_at is not None:
            return None
        skipped: list[str] = []
        for _ in range(8):  # another reviewer filled the item between choice and lock
            with self._claim_lock, self.session() as s:
                item, own = self._candidate(s, batch, reviewer, skipped)
                if item is None:
                    return None
                if not own and not self._room(s, item.id, reviewer, batch):
                    s.rollback()
                    skipped.append(item.id)
                    continue
                row = s.get(Assignment, (item.id, reviewer))
                if row is None:
                    s.add(Assignment(item_id=item.id, reviewer=reviewer))
                else:
                    row.assigned_at = _now()
                try:
                    s.commit()
                except IntegrityError:  # the same reviewer in two tabs: already assigned
                    s.rollback()
                return BlindItem(item.id, batch_id, item.prompt, item.response,
                                 batch.quality_bar, batch.simulated)
        return None

    def _candidate(self, s: Session, batch: ReviewBatch, reviewer: str, skipped: list[str]):
        k, batch_id = batch.verdicts_per_item, batch.id
        cutoff = _now() - ASSIGNMENT_LEASE
        given = (select(Verdict.item_id, func.count().label("n"),
                        func.sum(case((Verdict.passed, 1), else_=0)).label("passes"))
                 .group_by(Verdict.item_id).subquery())
        held = (select(Assignment.item_id, func.count().label("n"))
                .where(*_live_holds_by_others(reviewer, cutoff))
                .group_by(Assignment.item_id).subquery())
        mine = select(Verdict.item_id).where(Verdict.reviewer == reviewer)
        n_given, n_held = func.coalesce(given.c.n, 0), func.coalesce(held.c.n, 0)
        load = n_given + n_held
        own = (select(Assignment.item_id).where(Assignment.reviewer == reviewer,
                                                Assignment.assigned_at > cutoff))
        if batch.sequential:
            # a curtailed item: served while unsettled, to at most as many reviewers at once
            # as the verdicts that could settle it (sequential.votes_to_settle)
            passes = func.coalesce(given.c.passes, 0)
            to_pass = k // 2 + 1 - passes
            to_fail = (k + 1) // 2 - (n_given - passes)
            need = case((to_pass < to_fail, to_pass), else_=to_fail)
            rules = (ReviewItem.serve_rank.is_not(None), need > 0,
                     or_(n_held < need, ReviewItem.id.in_(own)))
            # an item already served to this reviewer first, then the plan's order: both
            # models' answers to a prompt before the next prompt
            order = (ReviewItem.id.in_(own).desc(), ReviewItem.serve_rank.asc(), load.asc(),
                     ReviewItem.position)
        else:
            rules = (n_given < k, or_(load < k, ReviewItem.id.in_(own)))
            # an item already served to this reviewer first (a reload shows it again), then
            # the items furthest from quorum, so work spreads out
            order = (ReviewItem.id.in_(own).desc(), load.asc(), ReviewItem.position)
        query = (select(ReviewItem, ReviewItem.id.in_(own).label("own"))
                 .outerjoin(given, given.c.item_id == ReviewItem.id)
                 .outerjoin(held, held.c.item_id == ReviewItem.id)
                 .where(ReviewItem.batch_id == batch_id, ReviewItem.id.not_in(mine),
                        ReviewItem.id.not_in(skipped) if skipped else True, *rules)
                 .order_by(*order)
                 .limit(1)
                 .with_for_update(skip_locked=True, of=ReviewItem))
        row = s.execute(query).first()
        return (row[0], bool(row[1])) if row is not None else (None, False)

    @staticmethod
    def _room(s: Session, item_id: str, reviewer: str, batch: ReviewBatch) -> bool:
        """Whether the item may be served to one more reviewer, counted under the lock:
        verdicts plus live holds by others short of k (a fixed panel), or live holds by
        others short of the verdicts that could settle it (a sequential panel)."""
        from rlhf_tasks.panel.sequential import votes_to_settle

        cutoff = _now() - ASSIGNMENT_LEASE
        votes = s.scalars(select(Verdict.passed).where(Verdict.item_id == item_id)).all()
        holds = int(s.scalar(select(func.count()).select_from(Assignment).where(
            Assignment.item_id == item_id, *_live_holds_by_others(reviewer, cutoff))))
        k = batch.verdicts_per_item
        if batch.sequential:
            return holds < votes_to_settle(sum(votes), len(votes) - sum(votes), k)
        return len(votes) + holds < k

    def record_verdict(self, item_id: str, reviewer: str, passed: bool, comment: str = "",
                       source: str = "web", seconds: float | None = None) -> int:
        """One verdict.  Refused: on a closed batch (BatchClosed); from a reviewer the
        batch excludes (ConflictOfInterest); on an item never served to this reviewer,
        unless it is an offline import by the admin, or one that already has its k
        verdicts (NotServed: counted under the batch's lock, so concurrent verdicts never
        overfill it); a second verdict of the same reviewer (AlreadyJudged).  A served
        item whose lease ran out is still taken while it is short of k.

        The verdict's time: from the item's first serving to this reviewer to now, on the
        store's clock, at most the batch's idle cap (``seconds`` is ignored); for an
        offline import, ``seconds`` as declared (or none); for a simulated rater, none."""
        if len(comment) > 5000:
            raise BadInput("a comment is at most 5000 characters", field="comment")
        # the count and the insert under one lock: the batch row's (PostgreSQL) or this
        # process's (SQLite, which has no row locks)
        with self._claim_lock, self.session() as s:
            item = s.get(ReviewItem, item_id)
            if item is None:
                raise UnknownItem(item_id)
            # the batch row is locked until this verdict commits, so a verdict and the
            # gate's close never interleave (PostgreSQL; SQLite has one writer at a time)
            batch = s.scalar(select(ReviewBatch).where(ReviewBatch.id == item.batch_id)
                             .with_for_update())
            if batch.closed_at is not None:
                raise BatchClosed(f"review batch {batch.id} closed at "
                                  f"{_aware(batch.closed_at).isoformat()}: the gate has decided")
            if reviewer in batch.excluded_reviewers:
                raise ConflictOfInterest(f"{reviewer} triggered or approves the run of batch "
                                         f"{batch.id}: they may not judge it")
            if s.scalar(select(Verdict.id).where(Verdict.item_id == item_id,
                                                 Verdict.reviewer == reviewer)) is not None:
                raise AlreadyJudged(f"{reviewer} has already judged item {item_id}")
            served = s.get(Assignment, (item_id, reviewer))
            if source != "import" and served is None:
                raise NotServed(f"item {item_id} was not served to {reviewer}")
            votes = s.scalars(select(Verdict.passed).where(Verdict.item_id == item_id)).all()
            if len(votes) >= batch.verdicts_per_item:
                raise NotServed(f"item {item_id} already has its {batch.verdicts_per_item} "
                                "verdicts")
            plan = batch.plan
            if plan is not None:
                from rlhf_tasks.panel.sequential import item_outcome

                if item.serve_rank is None:
                    raise NotServed(f"item {item_id} is not part of the sequential panel's "
                                    "decision")
                if item_outcome(list(votes), plan.k) is not None:
                    raise NotServed(f"item {item_id} is already settled")
            verdict = Verdict(item_id=item_id, reviewer=reviewer, passed=bool(passed),
                              comment=comment or "", source=source,
                              seconds=self._seconds(s, batch, served, source, seconds))
            s.add(verdict)
            if plan is not None:
                # decided with this verdict: the batch closes in the same transaction, so
                # no reviewer is served another of its items
                s.flush()
                if self._sequential_state(s, batch, plan).decided:
                    batch.closed_at = func.now()
            try:
                s.commit()
            except IntegrityError:
                s.rollback()
                raise AlreadyJudged(f"{reviewer} has already judged item {item_id}") from None
            return verdict.id

    @staticmethod
    def _seconds(s: Session, batch: ReviewBatch, served: Assignment | None, source: str,
                 declared: float | None) -> float | None:
        if source == "simulated":
            return None
        if source == "import":
            return None if declared is None else float(declared)
        if served is None or served.served_at is None:
            return None  # served before the store measured time
        now = s.scalar(select(func.now()))
        if isinstance(now, str):  # SQLite's CURRENT_TIMESTAMP through a raw select
            now = datetime.fromisoformat(now)
        now = _aware(now)
        elapsed = max(0.0, (now - _aware(served.served_at)).total_seconds())
        cap = batch.idle_cap_seconds if batch.idle_cap_seconds is not None \
            else DEFAULT_IDLE_CAP_S
        return round(min(elapsed, cap), 3)

    @staticmethod
    def _sequential_state(s: Session, batch: ReviewBatch, plan, *, final: bool = False):
        from rlhf_tasks.panel.sequential import evaluate

        query = (select(Verdict.id, Verdict.item_id, Verdict.reviewer, Verdict.passed,
                        ReviewItem.model, ReviewItem.prompt_index)
                 .join(ReviewItem, ReviewItem.id == Verdict.item_id)
                 .where(ReviewItem.batch_id == batch.id, ReviewItem.model.in_(plan.models)))
        if batch.closed_at is not None:  # what the gate decided on
            query = query.where(Verdict.created_at <= batch.closed_at)
        rows = [dict(r._mapping) for r in s.execute(query).all()]
        items = s.scalar(select(func.count()).select_from(ReviewItem)
                         .where(ReviewItem.batch_id == batch.id))
        return evaluate(plan, rows, items_in_batch=int(items), final=final)

    def sequential_state(self, batch_id: str, *, final: bool = False):
        """The sequential panel's state (None for a fixed panel); ``final``: as the gate
        reads a batch it closed at the deadline."""
        batch = self.batch(batch_id)
        plan = batch.plan
        if plan is None:
            return None
        with self.session() as s:
            return self._sequential_state(s, batch, plan, final=final)

    def progress(self, batch_id: str, reviewer: str | None = None) -> dict:
        batch = self.batch(batch_id)
        k = batch.verdicts_per_item
        with self.session() as s:
            items = s.scalar(select(func.count()).select_from(ReviewItem)
                             .where(ReviewItem.batch_id == batch_id))
            per_item = s.scalars(select(func.count()).select_from(Verdict)
                                 .join(ReviewItem, ReviewItem.id == Verdict.item_id)
                                 .where(ReviewItem.batch_id == batch_id)
                                 .group_by(Verdict.item_id)).all()
            counts = (sum(min(n, k) for n in per_item), sum(n >= k for n in per_item))
            out = {"batch_id": batch_id, "items": items, "verdicts_per_item": k,
                   "verdicts_needed": items * k, "verdicts_given": int(counts[0]),
                   "items_complete": int(counts[1]), "simulated": batch.simulated}
            out["complete"] = items > 0 and out["items_complete"] == items
            plan = batch.plan
            if plan is not None:
                # a sequential panel is complete when it has decided (and closed itself)
                state = self._sequential_state(s, batch, plan)
                # reviewers read this too: while the batch is open it says how far the
                # panel got, never how the comparison stands (that could sway a verdict)
                out["sequential"] = {key: getattr(state, key) for key in (
                    "decided", "prompts", "prompts_decided", "verdicts_used",
                    "verdicts_fixed")}
                if batch.closed_at is not None:
                    out["sequential"].update(look=state.look, reason=state.reason)
                out["complete"] = state.decided and batch.closed_at is not None
            if reviewer is not None:
                out["reviewer"] = reviewer
                out["judged_by_reviewer"] = s.scalar(
                    select(func.count()).select_from(Verdict)
                    .join(ReviewItem, ReviewItem.id == Verdict.item_id)
                    .where(ReviewItem.batch_id == batch_id, Verdict.reviewer == reviewer))
        return out

    def verdict_rows(self, batch_id: str) -> list[dict]:
        """Every verdict of the batch with its item's model (for aggregation: server side);
        of a closed batch, those given before it closed."""
        closed = self.batch(batch_id).closed_at
        with self.session() as s:
            query = (select(Verdict.id, Verdict.item_id, Verdict.reviewer, Verdict.passed,
                            Verdict.comment, Verdict.source, Verdict.created_at,
                            Verdict.seconds, ReviewItem.model, ReviewItem.prompt_index)
                     .join(ReviewItem, ReviewItem.id == Verdict.item_id)
                     .where(ReviewItem.batch_id == batch_id).order_by(Verdict.id))
            if closed is not None:
                query = query.where(Verdict.created_at <= closed)
            rows = s.execute(query).all()
        return [dict(r._mapping) for r in rows]

    def items(self, batch_id: str, *, with_model: bool = False) -> list[dict]:
        with self.session() as s:
            rows = s.scalars(select(ReviewItem).where(ReviewItem.batch_id == batch_id)
                             .order_by(ReviewItem.position)).all()
        keys = ["id", "prompt", "response"] + (["model", "prompt_index"] if with_model else [])
        return [{k: getattr(r, k) for k in keys} for r in rows]


def _live_holds_by_others(reviewer: str, cutoff: datetime) -> tuple:
    """Conditions on Assignment: another reviewer holds the item, served after ``cutoff``
    (the lease is live), and has not judged it yet."""
    return (Assignment.reviewer != reviewer, Assignment.assigned_at > cutoff,
            ~select(Verdict.id).where(Verdict.item_id == Assignment.item_id,
                                      Verdict.reviewer == Assignment.reviewer).exists())


def _add_missing_columns(engine) -> None:
    """Columns added since a store was created (nullable ones only), added in place: a
    store made by an older release keeps its batches and verdicts."""
    from sqlalchemy import inspect, text

    inspector = inspect(engine)
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            present = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in present and column.nullable:
                    kind = column.type.compile(dialect=engine.dialect)
                    conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN '
                                      f'{column.name} {kind}'))


def _masked(url: str) -> str:
    """A SQLAlchemy URL with its password as ***."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy can parse: show nothing of it
        return "<unparsable store URL>"


def panel_store_url(cfg) -> str:
    """``$RLHF_PANEL_STORE_URL`` when set (production: from a secret, so the password is
    never in a config file or a Param), else ``panel.store_url``."""
    import os

    return os.environ.get("RLHF_PANEL_STORE_URL") or cfg.panel.store_url
