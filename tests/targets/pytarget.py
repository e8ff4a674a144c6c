"""A Python target for tests, using memfs.client (libpredicomp_client via cffi).

Speaks the command language of native/targets/memfs_target.c on stdin/stdout
(verify, rss, write PAGE BYTE, prefetch FIRST COUNT, stats, stop, exit).  With
--fill-after-start the data is written after the session started, so every
page first arrives through a fault the daemon serves.
"""
import argparse
import hashlib
import random
import sys

from memfs.client import Client

PAGE = 4096
WORDS = [w.encode() for w in "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()]


def page_data(i: int, seed: int) -> bytes:
    rnd = random.Random(seed * 1000003 + i)
    kind = i % 4
    if kind == 0:
        return bytes(PAGE)
    if kind == 1:
        out = bytearray()
        while len(out) < PAGE:
            out += b"id=%08d %s %s qty=%d\n" % (rnd.randrange(10**8), rnd.choice(WORDS), rnd.choice(WORDS), rnd.randrange(1000))
        return bytes(out[:PAGE])
    if kind == 2:
        small = bytearray(PAGE)
        small[0::4] = rnd.randbytes(PAGE // 4)  # little-endian uint32 values below 256
        return bytes(small)
    return rnd.randbytes(PAGE)


def digest(b) -> bytes:
    return hashlib.blake2b(b, digest_size=8).digest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--socket")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fill-after-start", action="store_true")
    args = ap.parse_args()
    npages = args.mb * 256
    with Client(args.socket) as c:
        buf = c.alloc(npages * PAGE)
        view = memoryview(buf)
        expect = []

        def fill():
            for i in range(npages):
                data = page_data(i, args.seed)
                view[i * PAGE:(i + 1) * PAGE] = data
                expect.append(digest(data))

        if not args.fill_after_start:
            fill()
        sid = c.start()
        if args.fill_after_start:
            fill()
        addr = __import__("ctypes").addressof(__import__("ctypes").c_char.from_buffer(buf))
        print(f"READY session={sid} pid={__import__('os').getpid()} addr=0x{addr:x} pages={npages} agent={int(c.has_agent)}", flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if not cmd:
                continue
            if cmd[0] == "verify":
                bad = [i for i in range(npages) if digest(view[i * PAGE:(i + 1) * PAGE]) != expect[i]]
                print(f"VERIFY ok={npages - len(bad)} bad={len(bad)} first_bad={bad[0] if bad else -1}", flush=True)
            elif cmd[0] == "rss":
                kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon:"))
                print(f"RSS anon_kb={kb}", flush=True)
            elif cmd[0] == "write":
                i, b = int(cmd[1]), int(cmd[2])
                view[i * PAGE:(i + 1) * PAGE] = bytes([b]) * PAGE
                expect[i] = digest(bytes([b]) * PAGE)
                print(f"WROTE {i}", flush=True)
            elif cmd[0] == "prefetch":
                c.prefetch(int(cmd[1]) * PAGE, int(cmd[2]) * PAGE)
                print("PREFETCH rc=0", flush=True)
            elif cmd[0] == "stats":
                st = c.stats()
                print("STATS rc=0 " + " ".join(f"{k}={v}" for k, v in st.items()), flush=True)
            elif cmd[0] == "stop":
                c.stop()
                print("STOP rc=0", flush=True)
            elif cmd[0] == "exit":
                break
            else:
                print("ERROR unknown command", flush=True)
        view.release()


if __name__ == "__main__":
    main()
