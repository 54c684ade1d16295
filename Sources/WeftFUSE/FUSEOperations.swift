import CFuse3
import Foundation
import WeftProto
import WeftVFS

extension FUSEAdapter {
    /// The low-level operation table. Every callback is a few lines: decode, call the VFS, reply.
    static func operations() -> fuse_lowlevel_ops {
        var ops = fuse_lowlevel_ops()
        ops.`init` = { userdata, conn in
            let adapter = Unmanaged<FUSEAdapter>.fromOpaque(userdata!).takeUnretainedValue()
            adapter.connectionInit(conn!)
            DispatchQueue.global().asyncAfter(deadline: .now() + 0.2) { adapter.raiseKernelReadahead() }
        }
        ops.destroy = { userdata in
            Unmanaged<FUSEAdapter>.fromOpaque(userdata!).takeUnretainedValue().destroy()
        }
        ops.lookup = { req, parent, name in
            FUSEAdapter.reply(req) {
                let a = FUSEAdapter.adapter(req)
                a.replyEntry(req, parent: parent, try a.vfs.lookup(FUSEAdapter.credentials(req), parent: parent, name: FUSEAdapter.name(name),
                                                                 caller: fuse_req_ctx(req)!.pointee.pid))
            }
        }
        ops.forget = { req, _, _ in fuse_reply_none(req) }
        ops.forget_multi = { req, _, _ in fuse_reply_none(req) }
        ops.getattr = { req, ino, _ in
            let refreshes = FUSEAdapter.adapter(req).vfs.leaseCache.refreshes
            let ticket = refreshes.begin(ino)
            defer { refreshes.end(ino, ticket) }
            FUSEAdapter.reply(req, staleIfMissing: true) {
                let a = FUSEAdapter.adapter(req)
                a.replyAttributes(req, try a.vfs.getattr(FUSEAdapter.credentials(req), ino: ino))
            }
        }
        ops.setattr = { req, ino, attr, toSet, fi in
            FUSEAdapter.reply(req) {
                let a = FUSEAdapter.adapter(req)
                let st = attr!.pointee
                var changes = SetAttributes(byHandle: fi != nil)
                if toSet & FUSE_SET_ATTR_MODE != 0 { changes.mode = st.st_mode }
                if toSet & FUSE_SET_ATTR_UID != 0 { changes.uid = st.st_uid }
                if toSet & FUSE_SET_ATTR_GID != 0 { changes.gid = st.st_gid }
                if toSet & FUSE_SET_ATTR_SIZE != 0 { changes.size = UInt64(st.st_size) }
                if toSet & FUSE_SET_ATTR_ATIME_NOW != 0 {
                    changes.atime = .now
                } else if toSet & FUSE_SET_ATTR_ATIME != 0 {
                    changes.atime = .nanoseconds(Int64(st.st_atim.tv_sec) * 1_000_000_000 + Int64(st.st_atim.tv_nsec))
                }
                if toSet & FUSE_SET_ATTR_MTIME_NOW != 0 {
                    changes.mtime = .now
                } else if toSet & FUSE_SET_ATTR_MTIME != 0 {
                    changes.mtime = .nanoseconds(Int64(st.st_mtim.tv_sec) * 1_000_000_000 + Int64(st.st_mtim.tv_nsec))
                }
                a.replyAttributes(req, try a.vfs.setattr(FUSEAdapter.credentials(req), ino: ino, changes))
            }
        }
        ops.readlink = { req, ino in
            FUSEAdapter.reply(req) {
                var target = try FUSEAdapter.adapter(req).vfs.readlink(FUSEAdapter.credentials(req), ino: ino)
                target.append(0)
                target.withUnsafeBufferPointer { buffer in
                    buffer.withMemoryRebound(to: CChar.self) { _ = fuse_reply_readlink(req, $0.baseAddress) }
                }
            }
        }
        ops.mknod = { req, parent, name, mode, rdev in
            FUSEAdapter.reply(req) {
                let a = FUSEAdapter.adapter(req)
                a.replyEntry(req, parent: parent, try a.vfs.mknod(FUSEAdapter.credentials(req), parent: parent, name: FUSEAdapter.name(name),
                                                  mode: mode, rdev: UInt32(truncatingIfNeeded: rdev), umask: FUSEAdapter.umask(req)))
            }
        }
        ops.mkdir = { req, parent, name, mode in
            FUSEAdapter.reply(req) {
                let a = FUSEAdapter.adapter(req)
                a.replyEntry(req, parent: parent, try a.vfs.mkdir(FUSEAdapter.credentials(req), parent: parent, name: FUSEAdapter.name(name),
                                                  mode: mode, umask: FUSEAdapter.umask(req)))
            }
        }
        ops.unlink = { req, parent, name in
            FUSEAdapter.reply(req) {
                try FUSEAdapter.adapter(req).vfs.unlink(FUSEAdapter.credentials(req), parent: parent, name: FUSEAdapter.name(name))
                fuse_reply_err(req, 0)
            }
        }
        ops.rmdir = { req, parent, name in
            FUSEAdapter.reply(req) {
                try FUSEAdapter.adapter(req).vfs.rmdir(FUSEAdapter.credentials(req), parent: parent, name: FUSEAdapter.name(name))
                fuse_reply_err(req, 0)
            }
        }
        ops.symlink = { req, link, parent, name in
            FUSEAdapter.reply(req) {
                let a = FUSEAdapter.adapter(req)
                a.replyEntry(req, parent: parent, try a.vfs.symlink(FUSEAdapter.credentials(req), parent: parent, name: FUSEAdapter.name(name),
                                                    target: FUSEAdapter.name(link)))
            }
        }
        ops.rename = { req, parent, name, newParent, newName, flags in
            FUSEAdapter.reply(req) {
                try FUSEAdapter.adapter(req).vfs.rename(FUSEAdapter.credentials(req), parent: parent, name: FUSEAdapter.name(name),
                                            newParent: newParent, newName: FUSEAdapter.name(newName),
                                            flags: RenameFlags(rawValue: UInt32(flags)))
                fuse_reply_err(req, 0)
            }
        }
        ops.link = { req, ino, newParent, newName in
            FUSEAdapter.reply(req) {
                let a = FUSEAdapter.adapter(req)
                a.replyEntry(req, parent: newParent, try a.vfs.link(FUSEAdapter.credentials(req), ino: ino, newParent: newParent,
                                                 newName: FUSEAdapter.name(newName)))
            }
        }
        ops.open = { req, ino, fi in
            FUSEAdapter.reply(req, staleIfMissing: true) {
                let (handle, keepCache) = try FUSEAdapter.adapter(req).vfs.open(FUSEAdapter.credentials(req), ino: ino, flags: fi!.pointee.flags)
                fi!.pointee.fh = handle
                fi!.pointee.keep_cache = keepCache ? 1 : 0
                Trace.note("fuse open ino=\(ino) flags=\(fi!.pointee.flags) keep_cache=\(keepCache)")
                if fuse_reply_open(req, fi) != 0 { try? FUSEAdapter.adapter(req).vfs.release(handle: handle) }
            }
        }
        ops.create = { req, parent, name, mode, fi in
            FUSEAdapter.reply(req) {
                let a = FUSEAdapter.adapter(req)
                let (attributes, handle) = try a.vfs.create(FUSEAdapter.credentials(req), parent: parent, name: FUSEAdapter.name(name),
                                                            mode: mode, umask: FUSEAdapter.umask(req), flags: fi!.pointee.flags)
                fi!.pointee.fh = handle
                var e = a.entry(attributes, parent: parent)
                if fuse_reply_create(req, &e, fi) != 0 { try? a.vfs.release(handle: handle) }
            }
        }
        ops.read = { req, ino, size, offset, fi in
            FUSEAdapter.reply(req) {
                let a = FUSEAdapter.adapter(req)
                let result = try a.vfs.read(handle: fi!.pointee.fh, offset: UInt64(offset), size: size)
                Trace.note("fuse read ino=\(ino) offset=\(offset) size=\(size) -> \(result.count)")
                var vectors = result.pieces.map {
                    iovec(iov_base: $0.block.pointer + $0.offset, iov_len: $0.length)
                }
                withExtendedLifetime(result) {
                    _ = fuse_reply_iov(req, &vectors, Int32(vectors.count))
                }
                a.dropUncoveredPages(ino, offset: offset, length: size)
            }
        }
        // `write_buf`, not `write`: with it libfuse receives requests by splicing /dev/fuse into a
        // pipe (FUSE_CAP_SPLICE_READ), which takes the written pages by reference, and the data
        // is read from that pipe straight into the write buffer: one copy fewer than reading the
        // request into libfuse's buffer first (SPEC.md §8, Writes).
        ops.write_buf = { req, ino, source, offset, fi in
            FUSEAdapter.reply(req) {
                let a = FUSEAdapter.adapter(req)
                let size = fuse_buf_size(source)
                let written = try a.vfs.write(handle: fi!.pointee.fh, offset: UInt64(offset), count: size) { piece in
                    let copied = weft_buf_copy_to(piece.baseAddress, piece.count, source)
                    if copied < 0 { throw WeftError(Int32(-copied), "cannot read the write's data") }
                    if copied != piece.count { throw WeftError(EIO, "the write's data ended after \(copied) of \(piece.count) bytes") }
                }
                fuse_reply_write(req, written)
                Trace.note("fuse write ino=\(ino) offset=\(offset) size=\(size) -> \(written)")
                // The kernel keeps the written pages: the same rule as for a read.
                a.dropUncoveredPages(ino, offset: offset, length: written)
            }
        }
        ops.flush = { req, ino, fi in
            FUSEAdapter.reply(req) {
                // close(2) drops the closing process's POSIX locks on the file (fcntl(2)).
                let a = FUSEAdapter.adapter(req)
                let unlocked = Result { try a.unlockAll(req, ino: ino, kind: .posix, owner: fi!.pointee.lock_owner) }
                try a.vfs.flush(handle: fi!.pointee.fh)
                try unlocked.get()
                fuse_reply_err(req, 0)
            }
        }
        ops.release = { req, ino, fi in
            FUSEAdapter.reply(req) {
                let a = FUSEAdapter.adapter(req)
                let unlocked = Result {
                    if fi!.pointee.flock_release != 0 {
                        try a.unlockAll(req, ino: ino, kind: .flock, owner: fi!.pointee.lock_owner)
                    }
                }
                try a.vfs.release(handle: fi!.pointee.fh)
                try unlocked.get()
                fuse_reply_err(req, 0)
            }
        }
        ops.getlk = { req, ino, fi, lock in
            FUSEAdapter.reply(req) {
                let a = FUSEAdapter.adapter(req)
                var request = try FUSEAdapter.lockRequest(lock!.pointee, owner: fi!.pointee.lock_owner)
                request.test = true
                let found = try a.vfs.lock(FUSEAdapter.credentials(req), ino: ino, request)
                var reply = lock!.pointee
                reply.l_type = Int16(found.type.rawValue)
                if found.type != .unlock {
                    reply.l_whence = Int16(SEEK_SET)
                    reply.l_start = off_t(found.start)
                    reply.l_len = found.end == .max ? 0 : off_t(found.end - found.start + 1)
                    reply.l_pid = pid_t(found.pid)
                }
                fuse_reply_lock(req, &reply)
            }
        }
        ops.setlk = { req, ino, fi, lock, sleep in
            FUSEAdapter.reply(req) {
                let request = try FUSEAdapter.lockRequest(lock!.pointee, owner: fi!.pointee.lock_owner)
                try FUSEAdapter.adapter(req).setLock(req, ino: ino, request, wait: sleep != 0)
                fuse_reply_err(req, 0)
            }
        }
        ops.flock = { req, ino, fi, operation in
            FUSEAdapter.reply(req) {
                let type: LockType = operation & LOCK_UN != 0 ? .unlock : operation & LOCK_EX != 0 ? .write : .read
                let request = LockRequest(kind: .flock, type: type, owner: fi!.pointee.lock_owner,
                                          pid: UInt32(bitPattern: fuse_req_ctx(req)!.pointee.pid))
                try FUSEAdapter.adapter(req).setLock(req, ino: ino, request, wait: operation & LOCK_NB == 0)
                fuse_reply_err(req, 0)
            }
        }
        ops.fsync = { req, _, _, fi in
            FUSEAdapter.reply(req) {
                try FUSEAdapter.adapter(req).vfs.fsync(handle: fi!.pointee.fh)
                fuse_reply_err(req, 0)
            }
        }
        ops.opendir = { req, ino, fi in
            FUSEAdapter.reply(req) {
                fi!.pointee.fh = try FUSEAdapter.adapter(req).vfs.opendir(FUSEAdapter.credentials(req), ino: ino)
                fuse_reply_open(req, fi)
            }
        }
        ops.readdir = { req, _, size, offset, fi in
            FUSEAdapter.reply(req) { try FUSEAdapter.adapter(req).replyDirectory(req, handle: fi!.pointee.fh, size: size, offset: offset, plus: false) }
        }
        ops.readdirplus = { req, _, size, offset, fi in
            FUSEAdapter.reply(req) { try FUSEAdapter.adapter(req).replyDirectory(req, handle: fi!.pointee.fh, size: size, offset: offset, plus: true) }
        }
        ops.releasedir = { req, _, fi in
            FUSEAdapter.adapter(req).vfs.releasedir(handle: fi!.pointee.fh)
            fuse_reply_err(req, 0)
        }
        ops.fsyncdir = { req, ino, _, _ in
            FUSEAdapter.reply(req) {
                try FUSEAdapter.adapter(req).vfs.syncDirectory(FUSEAdapter.credentials(req), ino: ino)
                fuse_reply_err(req, 0)
            }
        }
        ops.statfs = { req, ino in
            FUSEAdapter.reply(req) {
                let stats = try FUSEAdapter.adapter(req).vfs.statfs(FUSEAdapter.credentials(req), ino: ino)
                var st = statvfs()
                st.f_bsize = UInt(stats.blockSizeBytes)
                st.f_frsize = UInt(stats.blockSizeBytes)
                st.f_blocks = UInt(stats.totalBlocks)
                st.f_bfree = UInt(stats.freeBlocks)
                st.f_bavail = UInt(stats.freeBlocks)
                st.f_files = UInt(stats.totalInodes)
                st.f_ffree = UInt(stats.freeInodes)
                st.f_favail = UInt(stats.freeInodes)
                st.f_namemax = UInt(stats.nameMaxBytes)
                fuse_reply_statfs(req, &st)
            }
        }
        ops.setxattr = { req, ino, name, value, size, flags in
            FUSEAdapter.reply(req) {
                let attribute = FUSEAdapter.name(name)
                let credentials = FUSEAdapter.credentials(req)
                if ino == UInt64(FUSE_ROOT_ID), attribute.elementsEqual(AgentControl.dropCacheAttribute.utf8) {
                    // `weft cache drop` (SPEC.md §8): served by the agent, never stored.
                    guard credentials.uid == 0 else { throw WeftError(EPERM, "cache drop needs root") }
                    _ = FUSEAdapter.adapter(req).vfs.dropCachedData()
                    fuse_reply_err(req, 0)
                    return
                }
                let bytes = size > 0 ? Array(UnsafeRawBufferPointer(start: value, count: size)) : []
                try FUSEAdapter.adapter(req).vfs.setxattr(credentials, ino: ino, name: attribute, value: bytes,
                                              flags: XattrFlags(rawValue: UInt32(flags)))
                fuse_reply_err(req, 0)
            }
        }
        ops.getxattr = { req, ino, name, size in
            FUSEAdapter.reply(req) {
                let attribute = FUSEAdapter.name(name)
                if ino == UInt64(FUSE_ROOT_ID), attribute.elementsEqual(AgentControl.cacheStatisticsAttribute.utf8) {
                    // `weft cache stats` (SPEC.md §8): served by the agent, never stored.
                    guard FUSEAdapter.credentials(req).uid == 0 else { throw WeftError(EPERM, "cache stats need root") }
                    guard let statistics = FUSEAdapter.adapter(req).vfs.cacheStatistics() else {
                        throw WeftError(ENODATA, "no volume open yet")
                    }
                    try FUSEAdapter.replySized(req, try statistics.json(), size: size)
                    return
                }
                let value = try FUSEAdapter.adapter(req).vfs.getxattr(FUSEAdapter.credentials(req), ino: ino, name: attribute)
                try FUSEAdapter.replySized(req, value, size: size)
            }
        }
        ops.listxattr = { req, ino, size in
            FUSEAdapter.reply(req) {
                let names = try FUSEAdapter.adapter(req).vfs.listxattr(FUSEAdapter.credentials(req), ino: ino)
                try FUSEAdapter.replySized(req, names.flatMap { $0 + [0] }, size: size)
            }
        }
        ops.removexattr = { req, ino, name in
            FUSEAdapter.reply(req) {
                try FUSEAdapter.adapter(req).vfs.removexattr(FUSEAdapter.credentials(req), ino: ino, name: FUSEAdapter.name(name))
                fuse_reply_err(req, 0)
            }
        }
        ops.access = { req, ino, mask in
            FUSEAdapter.reply(req) {
                try FUSEAdapter.adapter(req).vfs.access(FUSEAdapter.credentials(req), ino: ino, mask: UInt32(mask))
                fuse_reply_err(req, 0)
            }
        }
        return ops
    }

    /// getxattr/listxattr protocol: size 0 asks for the length; a too-small buffer is ERANGE.
    static func replySized(_ req: fuse_req_t?, _ bytes: [UInt8], size: Int) throws {
        if size == 0 {
            fuse_reply_xattr(req, bytes.count)
        } else if bytes.count > size {
            throw WeftError.rangeError
        } else {
            bytes.withUnsafeBytes { _ = fuse_reply_buf(req, $0.baseAddress?.assumingMemoryBound(to: CChar.self), $0.count) }
        }
    }

    func replyDirectory(_ req: fuse_req_t?, handle: UInt64, size: Int, offset: off_t, plus: Bool) throws {
        let entries = try vfs.readdir(handle: handle, offset: Int(offset), limit: max(1, size / 32))
        var buffer = [CChar](repeating: 0, count: size)
        var used = 0
        for (position, item) in entries.enumerated() {
            let next = off_t(Int(offset) + position + 1)
            var name = item.name.map { CChar(bitPattern: $0) }
            name.append(0)
            let needed: Int = buffer.withUnsafeMutableBufferPointer { out in
                let destination = out.baseAddress! + used
                if plus {
                    var e = entry(item.attributes, parent: nil)
                    if item.name == [0x2E] || item.name == [0x2E, 0x2E] {
                        // "." and ".." take no lookup reference.
                        e = fuse_entry_param()
                        e.attr.st_ino = UInt(item.ino)
                        e.attr.st_mode = item.attributes.mode
                    }
                    return fuse_add_direntry_plus(req, destination, size - used, name, &e, next)
                }
                var st = stat(item.attributes)
                return fuse_add_direntry(req, destination, size - used, name, &st, next)
            }
            if needed > size - used { break }
            used += needed
        }
        fuse_reply_buf(req, buffer, used)
    }
}
