"""A scripted NVMe/TCP controller in Python, for what a real target never sends.

It speaks enough of the protocol for an attach (ICResp, Fabrics Connect, Property Get/Set,
Identify, Set Features, Keep Alive) with one 1 MiB namespace, serves writes (in-capsule and
through R2T) and reads from memory, and misbehaves on I/O queues as ``mode`` says:

- ``overrun``: a read's C2HData carries more bytes than the command asked for;
- ``badcid``: a read is answered for a command identifier that is not in flight;
- ``offset``: a read's data starts at an offset other than 0;
- ``r2t``: a write's R2T asks for bytes past the end of the command;
- ``ddgst``: (data digests on) a read's data digest is wrong;
- ``good``: none of that.
"""

from __future__ import annotations

import socket
import struct
import threading

BLOCKS = 2048
SERIAL = b"FAKE0001".ljust(20)

def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


class FakeController:
    def __init__(self, mode: str = "good") -> None:
        self.mode = mode
        self.disk = bytearray(BLOCKS * 512)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.io_connections = 0
        self._writes: dict[int, dict] = {}
        self.conns: list[socket.socket] = []
        self._t = threading.Thread(target=self._accept, daemon=True)
        self._t.start()

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    # ------------------------------------------------------------ protocol

    @staticmethod
    def _recv(c: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = c.recv(n - len(buf))
            if not chunk:
                raise ConnectionError
            buf += chunk
        return buf

    def _serve(self, c: socket.socket) -> None:
        try:
            self._session(c)
        except (ConnectionError, OSError):
            pass
        finally:
            c.close()

    def _session(self, c: socket.socket) -> None:
        icreq = self._recv(c, 128)
        dg = icreq[11] & 3
        hd, dd = (4 if dg & 1 else 0), (4 if dg & 2 else 0)
        resp = bytearray(128)
        resp[0], resp[2] = 1, 128
        struct.pack_into("<IHBBI", resp, 4, 128, 0, 0, dg, 1 << 17)
        c.sendall(resp)
        qid = None
        while True:
            ch = self._recv(c, 8)
            ptype, hlen, pdo, plen = ch[0], ch[2], ch[3], struct.unpack_from("<I", ch, 4)[0]
            rest = self._recv(c, plen - 8)
            if ptype == 4:                                   # CapsuleCmd
                sqe = rest[:64]
                data = rest[hlen - 8 + hd:plen - 8 - (dd if pdo else 0)] if pdo else b""
                qid = self._command(c, sqe, data, qid, hd, dd)
            elif ptype == 6:                                 # H2CData
                cid, _ttag, datao, datal = struct.unpack_from("<HHII", rest, 0)
                payload = rest[hlen - 8 + hd:hlen - 8 + hd + datal]
                w = self._writes.pop(cid)
                self.disk[w["off"] + datao:w["off"] + datao + datal] = payload
                if datao + datal >= w["len"]:
                    self._cqe(c, cid, hd)
                else:
                    self._writes[cid] = w

    def _pdu(self, c, ptype, flags, body: bytes, hd: int, data: bytes = b"", dd: int = 0,
             corrupt: bool = False) -> None:
        hlen = 8 + len(body)
        pdo = hlen + hd if data else 0
        plen = hlen + hd + len(data) + (dd if data else 0)
        hdr = bytes([ptype, flags | (1 if hd else 0) | (2 if data and dd else 0), hlen, pdo]) + \
            struct.pack("<I", plen) + body
        out = hdr + (struct.pack("<I", crc32c(hdr)) if hd else b"") + data
        if data and dd:
            digest = crc32c(data)
            if corrupt:
                digest ^= 1
            out += struct.pack("<I", digest)
        c.sendall(out)

    def _cqe(self, c, cid: int, hd: int, dw0: int = 0, status: int = 0) -> None:
        self._pdu(c, 5, 0, struct.pack("<IIHHHH", dw0, 0, 0, 0, cid, status << 1), hd)

    def _c2h(self, c, cid: int, data: bytes, hd: int, dd: int, datao: int = 0, corrupt: bool = False) -> None:
        self._pdu(c, 7, 4, struct.pack("<HHIII", cid, 0, datao, len(data), 0), hd, data, dd, corrupt)

    def _command(self, c, sqe: bytes, data: bytes, qid, hd: int, dd: int):
        opc, cid = sqe[0], struct.unpack_from("<H", sqe, 2)[0]
        cdw10 = struct.unpack_from("<I", sqe, 40)[0]
        if opc == 0x7F:
            fctype = sqe[4]
            if fctype == 1:                                  # Connect
                qid = struct.unpack_from("<H", sqe, 42)[0]
                if qid:
                    self.io_connections += 1
                self._cqe(c, cid, hd, dw0=1)
            elif fctype == 4:                                # Property Get
                off = struct.unpack_from("<I", sqe, 44)[0]
                val = {0x0: 127 | (20 << 24), 0x8: 0x10300, 0x1C: 1}.get(off, 0)
                self._pdu(c, 5, 0, struct.pack("<QHHHH", val, 0, 0, cid, 0), hd)
            else:
                self._cqe(c, cid, hd)
            return qid
        if qid == 0:
            if opc == 0x06:                                  # Identify
                cns = cdw10 & 0xFF
                buf = bytearray(4096)
                if cns == 1:
                    buf[4:24] = SERIAL
                    buf[24:64] = b"fake controller".ljust(40)
                    buf[64:72] = b"1.0".ljust(8)
                    struct.pack_into("<I", buf, 516, 1)      # NN
                    struct.pack_into("<I", buf, 1792, (64 + 8192) // 16)
                elif cns == 2:
                    struct.pack_into("<I", buf, 0, 1)
                elif cns == 0:
                    struct.pack_into("<QQQ", buf, 0, BLOCKS, BLOCKS, BLOCKS)
                    buf[128 + 2] = 9                         # LBAF0: 512-byte blocks
                self._c2h(c, cid, bytes(buf), hd, dd)
                self._cqe(c, cid, hd)
            elif opc == 0x09:                                # Set Features: queues
                self._cqe(c, cid, hd, dw0=(3 << 16) | 3)
            else:
                self._cqe(c, cid, hd)
            return qid
        slba = struct.unpack_from("<Q", sqe, 40)[0]
        nlb = (struct.unpack_from("<I", sqe, 48)[0] & 0xFFFF) + 1
        off, length = slba * 512, nlb * 512
        if opc == 0x02:                                      # Read
            payload = bytes(self.disk[off:off + length])
            if self.mode == "overrun":
                self._c2h(c, cid, payload + bytes(512), hd, dd)
            elif self.mode == "badcid":
                self._c2h(c, (cid + 77) % 128 + 1000, payload, hd, dd)
            elif self.mode == "offset":
                self._c2h(c, cid, payload[:512], hd, dd, datao=512)
            else:
                self._c2h(c, cid, payload, hd, dd, corrupt=self.mode == "ddgst")
                self._cqe(c, cid, hd)
        elif opc == 0x01:                                    # Write
            if data:
                self.disk[off:off + len(data)] = data
                self._cqe(c, cid, hd)
            else:
                self._writes[cid] = {"off": off, "len": length}
                r2tl = length + 4096 if self.mode == "r2t" else length
                self._pdu(c, 9, 0, struct.pack("<HHIII", cid, 1, 0, r2tl, 0), hd)
        else:
            self._cqe(c, cid, hd)
        return qid

