"""A WEPPcloud worker, as far as locks, files and the cache go.

It speaks WEPPcloud's NoDb protocol the way `wepppy/nodb/base.py` does
(commit c167a5e9), without wepppy itself (controllers are handled as plain
JSON instead of jsonpickle objects):

- lock():   READONLY and run-replacement checks, then
            SET nodb-lock:<runid>:<name>.nodb <payload> NX EX <ttl> with the
            compact JSON payload {token, owner, acquired_at, expires_at, ttl},
            then HSET <runid> locked:<name>.nodb true. No wait inside lock():
            the caller retries (here: with a short random backoff).
- hydrate:  GET <abs path of the .nodb> in DB 13; the cached copy is used only
            when its _nodb_mtime/_nodb_size match os.stat of the file (mtime
            within 1e-6 s, size exact); otherwise the file is read and the cache
            written (getInstance's disk path), with the signature.
- dump():   ownership check by token, stale-write guard (the file's signature
            must still be the one loaded), temp file + fsync + os.replace, the
            monotonic-mtime rule for same-size rewrites, nodb.version, then
            SET of the cache (the object with its new signature, 72 h) and
            HSET <runid> last_modified.
- unlock(): Lua compare-and-delete on the payload it read, then
            HSET <runid> locked:<name>.nodb false.

It prints "ready" once connected and starts when a line arrives on its
standard input. Each update increments the controller's "_rs_counter".
Every acknowledged
update is printed as one JSON line: the controller, the time the lock was
taken and the time it was about to be given back (time.time(), the same
wall clock the runstate side reads), and the counter written.

usage: weppcloud_worker.py PORT WD RUNID DOCS ITERATIONS SEED
"""

import json
import os
import random
import socket
import sys
import tempfile
import time
import uuid
import hashlib

import redis

LOCK_DEFAULT_TTL = 6 * 3600
REDIS_NODB_EXPIRY = 72 * 3600
EPSILON = 1e-6
CURRENT_VERSION = 1000
UNLOCK = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
          "return redis.call('del', KEYS[1]) else return 0 end")


class Worker:
    def __init__(self, port, wd, runid):
        self.lock_db = redis.StrictRedis(host="127.0.0.1", port=port, db=0, decode_responses=True)
        self.cache_db = redis.StrictRedis(host="127.0.0.1", port=port, db=13, decode_responses=True)
        self.wd = os.path.abspath(wd)
        self.runid = runid

    def nodb(self, name):
        return os.path.join(self.wd, name + ".nodb")

    def lock_key(self, name):
        return "nodb-lock:%s:%s.nodb" % (self.runid, name)

    def replacement_key(self):
        digest = hashlib.sha256(("run\0" + self.runid).encode("utf-8")).hexdigest()
        return "nodb:run-replacement:" + digest

    # -- lock() -------------------------------------------------------------
    def lock(self, name):
        if os.path.exists(os.path.join(self.wd, "READONLY")):
            raise RuntimeError("lock() called on readonly project")
        if self.lock_db.get(self.replacement_key()) is not None:
            return None
        token = uuid.uuid4().hex
        now = int(time.time())
        payload = json.dumps({
            "token": token,
            "owner": "%s:%d" % (socket.gethostname(), os.getpid()),
            "acquired_at": now,
            "expires_at": now + LOCK_DEFAULT_TTL,
            "ttl": LOCK_DEFAULT_TTL,
        }, separators=(",", ":"))
        if not self.lock_db.set(self.lock_key(name), payload, nx=True, ex=LOCK_DEFAULT_TTL):
            return None
        if self.lock_db.get(self.replacement_key()) is not None:
            self.lock_db.eval(UNLOCK, 1, self.lock_key(name), payload)
            return None
        self.lock_db.hset(self.runid, "locked:%s.nodb" % name, "true")
        return token

    def unlock(self, name, token):
        stored = self.lock_db.get(self.lock_key(name))
        if stored is None:
            self.lock_db.hset(self.runid, "locked:%s.nodb" % name, "false")
            raise RuntimeError("lock of %s lost before unlock" % name)
        if json.loads(stored).get("token") != token:
            raise RuntimeError("unlock() called with non-matching token")
        if not self.lock_db.eval(UNLOCK, 1, self.lock_key(name), stored):
            raise RuntimeError("unlock() lost ownership before release")
        self.lock_db.hset(self.runid, "locked:%s.nodb" % name, "false")

    # -- getInstance / _hydrate_instance -------------------------------------
    def hydrate(self, name):
        path = self.nodb(name)
        st = os.stat(path)
        cached = self.cache_db.get(path)
        if cached is not None:
            try:
                obj = json.loads(cached)
            except ValueError:
                self.cache_db.delete(path)
                obj = None
            if obj is not None:
                mtime = obj.get("_nodb_mtime")
                size = obj.get("_nodb_size")
                if (mtime is not None and size is not None
                        and size == st.st_size and abs(mtime - st.st_mtime) <= EPSILON):
                    return obj, (mtime, size)
        # The bytes and their signature from one descriptor, as WEPPcloud's
        # newest readers do.
        with open(path) as fp:
            text = fp.read()
            st = os.fstat(fp.fileno())
        obj = json.loads(text)
        obj["_nodb_mtime"] = st.st_mtime
        obj["_nodb_size"] = st.st_size
        # getInstance writes the cache after every disk load.
        self.cache_db.set(path, json.dumps(obj), ex=REDIS_NODB_EXPIRY)
        return obj, (st.st_mtime, st.st_size)

    # -- dump() -------------------------------------------------------------
    def dump(self, name, token, obj, signature):
        stored = self.lock_db.get(self.lock_key(name))
        if stored is None:
            raise RuntimeError("cannot dump to unlocked db")
        if json.loads(stored).get("token") != token:
            raise RuntimeError("cannot dump with non-matching lock token")
        path = self.nodb(name)
        expected_mtime, expected_size = signature
        st = os.stat(path)
        if st.st_mtime != expected_mtime or st.st_size != expected_size:
            raise RuntimeError("stale NoDb write rejected for %s" % path)
        js = json.dumps(obj)
        fd, temp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), suffix=".tmp",
                                    dir=self.wd, text=True)
        with os.fdopen(fd, "w") as fp:
            os.fchmod(fp.fileno(), 0o644)
            fp.write(js)
            fp.flush()
            os.fsync(fp.fileno())
            post = os.fstat(fp.fileno())
            os.replace(temp, path)
            post_mtime, post_size = post.st_mtime, post.st_size
            if post_size == expected_size and post_mtime <= expected_mtime:
                forced = max(time.time_ns(), int(round(expected_mtime * 1e9)) + 1_000_000_000)
                os.utime(path, ns=(os.stat(path).st_atime_ns, forced))
                os.fsync(fp.fileno())
                refreshed = os.stat(path)
                post_mtime, post_size = refreshed.st_mtime, refreshed.st_size
        version = os.path.join(self.wd, "nodb.version")
        fd, temp = tempfile.mkstemp(dir=self.wd, prefix="nodb.version.", suffix=".tmp")
        with os.fdopen(fd, "w") as fp:
            fp.write("%d\n" % CURRENT_VERSION)
        os.replace(temp, version)
        obj["_nodb_mtime"] = post_mtime
        obj["_nodb_size"] = post_size
        self.cache_db.set(path, json.dumps(obj), ex=REDIS_NODB_EXPIRY)
        self.lock_db.hset(self.runid, "last_modified", str(int(round(post_mtime))))


def main():
    port, wd, runid, docs, iterations, seed = sys.argv[1:7]
    rng = random.Random(int(seed))
    worker = Worker(int(port), wd, runid)
    worker.lock_db.ping()
    worker.cache_db.ping()
    docs = docs.split(",")
    # Ready: wait for the test to start every worker of both sides at once.
    print("ready", flush=True)
    sys.stdin.readline()
    deadline = time.time() + 120
    for i in range(int(iterations)):
        name = docs[i % len(docs)]
        if rng.random() < 0.3:
            # An unlocked read, as a web request's getInstance does.
            worker.hydrate(name)
        while True:
            token = worker.lock(name)
            if token is not None:
                break
            if time.time() > deadline:
                raise RuntimeError("could not lock %s for two minutes" % name)
            time.sleep(rng.uniform(0.001, 0.02))
        start = time.time()
        obj, signature = worker.hydrate(name)
        obj["_rs_counter"] = int(obj.get("_rs_counter", 0)) + 1
        # A step that takes a while, as a real one does.
        time.sleep(rng.uniform(0, 0.004))
        # The file holds the previous generation's signature, as in WEPPcloud.
        worker.dump(name, token, obj, signature)
        end = time.time()
        worker.unlock(name, token)
        print(json.dumps({"doc": name, "start": start, "end": end,
                          "counter": obj["_rs_counter"]}), flush=True)


if __name__ == "__main__":
    main()
