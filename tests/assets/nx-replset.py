#!/usr/bin/env python3
"""nx-27017 as a one-member MongoDB replica set, for luna's MongoDB tests.

luna's MongoDB store commits every batch as a multi-document transaction, and the MongoDB
drivers start transactions only on a replica set (or a sharded cluster). nx-27017 (PyPI)
implements startTransaction/commitTransaction/abortTransaction, but its `hello` announces a
standalone server, so the Rust driver refuses to start a transaction ("Transactions are not
supported by this deployment"). This launcher runs nx-27017 in-process with two changes:

1. `hello` / `isMaster` answer as the primary of a one-member replica set: `setName`,
   `hosts` = `primary` = `me` = the address nx listens on, `isWritablePrimary`,
   `secondary: false`, `setVersion`, `electionId`. With `replicaSet=<name>` in the URL the driver's
   SDAM then sees an RSPrimary and the topology becomes ReplicaSetWithPrimary; `hosts` must be
   exactly the seed address, or the driver would drop the seed as a wrong member. No
   `topologyVersion` is sent: with it the driver switches its monitor to the streaming
   protocol (awaitable hello with exhaustAllowed / moreToCome), which nx does not speak; without
   it the driver polls hello every heartbeatFrequencyMS.

2. Transactions are isolated. nx keeps one SQLite connection per database and a second
   session's startTransaction there only opens a SAVEPOINT inside the first one's
   transaction: concurrent transactions (two luna-servers) would see and roll back each
   other's writes. Here a transaction owns the server from its first command to its
   commit or abort: another session's transaction, or any command outside a transaction,
   waits for it (so nothing reads uncommitted data). Transactions start in the order they
   asked (first come, first served), and while one waits no new read starts, so neither
   starves. MongoDB instead lets unrelated
   transactions run side by side and fails the second writer of a record with WriteConflict;
   serializing is the simplest behaviour that is at least as strict. A transaction that is
   left open is aborted when the client connection that sent its last command closes (its
   process died: SIGKILL closes every socket) or after --transaction-lifetime seconds
   without a command (MongoDB's transactionLifetimeLimitSeconds, 60 s by default); a later
   command of it gets NoSuchTransaction labelled TransientTransactionError, as from MongoDB.

Usage (the nx-27017 arguments are passed through; --threaded is added, the gate blocks threads;
--owner-file names a file that holds the session id of the open transaction, empty when none):
    /opt/luna-venv/bin/python3 nx-replset.py [--set-name rs0] [--transaction-lifetime 60] \
        [--owner-file PATH] \
        --db memory --host 127.0.0.1 -p 27018
Then connect with mongodb://127.0.0.1:27018/luna?replicaSet=rs0.
"""

import argparse
import collections
import sys
import threading
import time

from bson.objectid import ObjectId
from nx_27017 import handler as nx_handler
from nx_27017 import nx_27017 as nx_cli
from nx_27017.wire_protocol import _extract_session_id

HELLO = ("hello", "Hello", "isMaster", "ismaster")


def body_of(msg):
    for section_type, doc in msg.get("sections") or ():
        if section_type == "body" and isinstance(doc, dict):
            return doc
    # Legacy OP_QUERY messages carry the command as "query".
    query = msg.get("query")
    return query if isinstance(query, dict) else {}


class Gate:
    """One transaction at a time; commands outside it wait (see the module doc)."""

    def __init__(self, handler, lifetime, owner_file):
        self.handler = handler
        self.owner_file = owner_file
        self.lifetime = lifetime
        self.cv = threading.Condition()
        self.owner = None  # session id of the open transaction
        self.owner_conn = None  # connection of its latest command
        self.deadline = 0.0
        self.busy = 0  # commands outside a transaction in progress
        self.queue = collections.deque()  # sessions waiting to start a transaction, in order

    def _set_owner(self, sid):
        """Records the session whose transaction is open (holds cv); with --owner-file, also
        in that file (empty: none), so a test can act while a transaction is open."""
        self.owner = sid
        if sid is None:
            self.owner_conn = None
        if self.owner_file:
            with open(self.owner_file, "w") as f:
                f.write(sid or "")

    def _abort_owner(self, why):
        """Rolls back the open transaction (holds cv)."""
        sid = self.owner
        self._set_owner(None)
        h = self.handler
        with h._sessions_lock:
            sessions = [(scope, s) for (s_id, scope), s in h._sessions.items() if s_id == sid]
        for scope, sess in sessions:
            if sess.in_transaction:
                with h._lock_for(scope or "test"):
                    try:
                        sess.abort_transaction()
                    except Exception as exc:  # the connection may be gone already
                        print(f"nx-replset: abort of {sid} failed: {exc}", file=sys.stderr)
        print(f"nx-replset: aborted the transaction of session {sid}: {why}", file=sys.stderr, flush=True)
        self.cv.notify_all()

    def _wait_free(self, ready):
        """Waits until no transaction is open and `ready()` (holds cv); expires an abandoned
        transaction."""
        while self.owner is not None or not ready():
            if self.owner is not None and time.monotonic() > self.deadline:
                self._abort_owner("transaction lifetime exceeded")
                continue
            self.cv.wait(0.05)

    def run(self, orig, handler, msg, *args, **kwargs):
        body = body_of(msg)
        if any(k in body for k in HELLO):
            return self.hello(orig, handler, msg, *args, **kwargs)
        conn = msg.get("_conn_id")
        lsid = body.get("lsid")
        sid = _extract_session_id(lsid) if isinstance(lsid, dict) else None
        in_txn = sid is not None and body.get("autocommit") is False
        if "endSessions" in body:
            result = orig(handler, msg, *args, **kwargs)
            ended = set()
            for s in body.get("endSessions") or ():
                ended.add(_extract_session_id(s) if isinstance(s, dict) else s)
            with self.cv:
                if self.owner in ended:
                    self._abort_owner("session ended")
            return result
        if not in_txn:
            with self.cv:
                # Queued transactions go first, so that none starves behind reads.
                self._wait_free(lambda: not self.queue)
                self.busy += 1
            try:
                return orig(handler, msg, *args, **kwargs)
            finally:
                with self.cv:
                    self.busy -= 1
                    self.cv.notify_all()
        ending = "commitTransaction" in body or "abortTransaction" in body
        with self.cv:
            if body.get("startTransaction") and self.owner != sid:
                # First come, first served: a busy client cannot starve another.
                self.queue.append(sid)
                try:
                    self._wait_free(lambda: not self.busy and self.queue[0] == sid)
                finally:
                    self.queue.remove(sid)
                self._set_owner(sid)
            elif self.owner != sid:
                return msg.get("request_id", 0), {
                    "ok": 0,
                    "code": 251,
                    "codeName": "NoSuchTransaction",
                    "errmsg": f"transaction {body.get('txnNumber')} has been aborted",
                    "errorLabels": ["TransientTransactionError"],
                }
            self.owner_conn = conn
            self.deadline = time.monotonic() + self.lifetime
        try:
            return orig(handler, msg, *args, **kwargs)
        finally:
            if ending:
                with self.cv:
                    if self.owner == sid:
                        self._set_owner(None)
                    self.cv.notify_all()

    def connection_closed(self, conn):
        with self.cv:
            if self.owner is not None and self.owner_conn == conn:
                self._abort_owner("its client connection closed")

    def hello(self, orig, handler, msg, *args, **kwargs):
        request_id, reply = orig(handler, msg, *args, **kwargs)
        if isinstance(reply, dict) and reply.get("ok"):
            reply.update(
                {
                    "isWritablePrimary": True,
                    "ismaster": True,
                    "secondary": False,
                    "setName": SET["name"],
                    "setVersion": 1,
                    "electionId": SET["election"],
                    "hosts": [SET["me"]],
                    "primary": SET["me"],
                    "me": SET["me"],
                }
            )
        return request_id, reply


SET = {}


def main():
    ours = argparse.ArgumentParser(add_help=False)
    ours.add_argument("--set-name", default="rs0")
    ours.add_argument("--transaction-lifetime", type=float, default=60.0)
    ours.add_argument("--owner-file", default=None)
    ours.add_argument("--host", default="127.0.0.1")
    ours.add_argument("-p", "--port", default="27017")
    args, rest = ours.parse_known_args()
    SET.update(name=args.set_name, me=f"{args.host}:{args.port}", election=ObjectId("7fffffff0000000000000001"))

    gates = {}
    original_init = nx_handler.NeoSQLiteHandler.__init__

    def init(self, *a, **kw):
        original_init(self, *a, **kw)
        gates[id(self)] = Gate(self, args.transaction_lifetime, args.owner_file)

    nx_handler.NeoSQLiteHandler.__init__ = init

    def gated(orig):
        def wrapper(self, msg, *a, **kw):
            return gates[id(self)].run(orig, self, msg, *a, **kw)

        return wrapper

    # handle_query (legacy OP_QUERY) passes commands on to handle_command: gated there.
    for name in ("handle_command", "handle_insert"):
        orig = getattr(nx_handler.NeoSQLiteHandler, name, None)
        if orig is not None:
            setattr(nx_handler.NeoSQLiteHandler, name, gated(orig))

    original_close = nx_handler.NeoSQLiteHandler.close_streams_for_connection

    def close(self, conn_id):
        original_close(self, conn_id)
        gates[id(self)].connection_closed(conn_id)

    nx_handler.NeoSQLiteHandler.close_streams_for_connection = close

    sys.argv = [sys.argv[0], *rest, "--host", args.host, "-p", str(args.port), "--threaded"]
    nx_cli.main()


if __name__ == "__main__":
    main()
