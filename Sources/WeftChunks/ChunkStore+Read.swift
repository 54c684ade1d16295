#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CWeftSupport
import Logging
import WeftProto

extension ChunkStore {
    /// Reads `length` bytes at `offset` of object `id`, verifying the CRC32C of every 64 KiB
    /// block it touches. Throws ENOENT if the object is missing, EINVAL for a range outside
    /// it, and EIO (after one log line naming the chunk, file and block) if it is damaged.
    public func read(id: SliceID, offset: Int, length: Int) throws -> [UInt8] {
        let object = try openObject(id)
        try checkRange(object, offset: offset, length: length)
        if length == 0 { return [] }
        return try [UInt8](unsafeUninitializedCapacity: length) { buffer, initialized in
            try readVerified(object, offset: offset, into: UnsafeMutableRawBufferPointer(buffer))
            initialized = length
        }
    }

    /// Reads `destination.count` bytes at `offset` of object `id` straight into `destination`,
    /// with the same checks and errors as `read(id:offset:length:)`. On error the contents of
    /// `destination` are unspecified.
    public func read(id: SliceID, offset: Int, into destination: UnsafeMutableRawBufferPointer) throws {
        let object = try openObject(id)
        try checkRange(object, offset: offset, length: destination.count)
        if destination.count == 0 { return }
        try readVerified(object, offset: offset, into: destination)
    }

    /// The raw (uncompressed) length of object `id`. ENOENT if missing, EIO if its header is damaged.
    public func length(id: SliceID) throws -> Int {
        try openObject(id).layout.rawLength
    }

    /// Reads and checks every block of object `id` from disk (bypassing the open-object
    /// cache), for fsck. Returns its raw length; ENOENT if missing, EIO if damaged.
    public func verify(id: SliceID) throws -> Int {
        let object = try openUncached(id)
        try workspaces.with { workspace in
            for index in object.layout.blocks.indices {
                let target = UnsafeMutableRawBufferPointer(
                    rebasing: workspace.raw[0..<object.layout.rawLength(ofBlock: index)])
                try loadBlock(object, index, workspace, into: target)
            }
        }
        return object.layout.rawLength
    }

    // MARK: Internals

    private func checkRange(_ object: OpenObject, offset: Int, length: Int) throws {
        let rawLength = object.layout.rawLength
        guard offset >= 0, length >= 0, offset <= rawLength, length <= rawLength - offset else {
            throw WeftError(EINVAL, "range \(offset)+\(length) outside chunk \(hex(object.id)) of \(rawLength) bytes")
        }
    }

    /// The open object for `id`, from the cache or opened, validated and cached.
    /// A store that reads another process's objects (`readOnly`) does not see that process
    /// delete or replace one: an object whose path no longer names the file it holds open is
    /// opened again (ENOENT, or the file that replaced it), as that process's own cache forgets
    /// it. By path, not by link count: NFS keeps a deleted file that is open under another name.
    func openObject(_ id: SliceID) throws -> OpenObject {
        let (cached, token) = cache.lookup(id)
        if let cached {
            guard readOnly, !isCurrent(cached) else { return cached }
            cache.remove(id)
            let fresh = cache.lookup(id).1
            return cache.insert(try openUncached(id), token: fresh)
        }
        return cache.insert(try openUncached(id), token: token)
    }

    /// Whether `object`'s path still names the file it holds open.
    private func isCurrent(_ object: OpenObject) -> Bool {
        var info = stat()
        guard FileIO.withObjectPath(object.id, { fstatat(root, $0, &info, AT_SYMLINK_NOFOLLOW) }) == 0 else { return false }
        return object.inode != 0 && UInt64(info.st_dev) == object.device && UInt64(info.st_ino) == object.inode
    }

    /// Forgets object `id`'s open descriptor (a read-only store after a failed read: the next
    /// read opens the file again).
    public func forgetOpenObject(_ id: SliceID) {
        cache.remove(id)
    }

    func openUncached(_ id: SliceID) throws -> OpenObject {
        // Another process's directory: no symbolic link followed, nothing but a regular file
        // read (a FIFO there must not block the reader).
        let flags = O_RDONLY | O_CLOEXEC | (readOnly ? O_NOFOLLOW | O_NONBLOCK : 0)
        let fd = FileIO.withObjectPath(id) { openat(root, $0, flags) }
        guard fd >= 0 else {
            let code = errno
            if code == ENOENT { throw WeftError(ENOENT, "chunk \(hex(id)) missing") }
            if code == EIO { throw damaged(id, block: "open", reason: String(cString: strerror(code))) }
            // Not the object's fault (EMFILE, ENOMEM, EACCES after a chmod of the store, ...):
            // its own errno, so that fsck --repair never takes it for damage and deletes it.
            logger.error("cannot open chunk \(hex(id)) at \(path(of: id)): \(String(cString: strerror(code)))")
            throw WeftError(code, "cannot open chunk \(hex(id))")
        }
        if readOnly {
            var status = stat()
            guard fstat(fd, &status) == 0, (status.st_mode & S_IFMT) == S_IFREG else {
                close(fd)
                throw WeftError(EINVAL, "chunk \(hex(id)) at \(path(of: id)) is not a regular file")
            }
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
        }
        do {
            return OpenObject(id: id, fd: fd, layout: try readLayout(fd, id))
        } catch {
            close(fd)
            throw error
        }
    }

    /// Reads and validates the header of the object open at `fd`. `adopting`: a header that
    /// fails is EBADMSG, not logged as damage of the stored object (an agent's file, `adopt`).
    func readLayout(_ fd: Int32, _ id: SliceID, adopting: Bool = false) throws -> ChunkLayout {
        let fileBytes: Int
        do {
            fileBytes = try FileIO.fileBytes(fd)
        } catch {
            throw readFailed(id, block: "header", error)
        }
        let prefixLength = min(fileBytes, ChunkFormat.maxHeaderBytes)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(prefixLength, 1), alignment: 16)
        defer { buffer.deallocate() }
        let got: Int
        do {
            got = try FileIO.preadFully(fd, buffer.baseAddress!, prefixLength, 0)
        } catch {
            throw readFailed(id, block: "header", error)
        }
        do {
            return try ChunkFormat.decodeHeader(UnsafeRawBufferPointer(rebasing: buffer[0..<got]),
                                                fileBytes: fileBytes, expectedID: id)
        } catch {
            if adopting { throw WeftError(EBADMSG, "\(error.block): \(error.reason)") }
            throw damaged(id, block: error.block, reason: error.reason)
        }
    }

    /// Fills `destination` with the raw bytes at `offset`, checking every block it touches.
    ///
    /// Runs of uncompressed blocks that `destination` covers whole are read with one `pread`
    /// straight into it and checked in place; a compressed block covered whole is decompressed
    /// straight into it; only the partial blocks at either end go through a workspace.
    private func readVerified(_ object: OpenObject, offset: Int, into destination: UnsafeMutableRawBufferPointer) throws {
        let blockSize = ChunkFormat.blockSizeBytes
        let layout = object.layout
        let end = offset + destination.count
        let lastBlock = (end - 1) / blockSize
        var index = offset / blockSize
        var workspace: Workspace?
        defer { if let workspace { workspaces.release(workspace) } }

        while index <= lastBlock {
            let blockStart = index * blockSize
            let blockLength = layout.rawLength(ofBlock: index)
            let coveredWhole = blockStart >= offset && blockStart + blockLength <= end
            if coveredWhole && !layout.blocks[index].compressed {
                var runEnd = index  // last block of the run of whole, uncompressed blocks
                while runEnd < lastBlock, !layout.blocks[runEnd + 1].compressed,
                      (runEnd + 1) * blockSize + layout.rawLength(ofBlock: runEnd + 1) <= end {
                    runEnd += 1
                }
                let runBytes = (runEnd - index) * blockSize + layout.rawLength(ofBlock: runEnd)
                let target = destination.baseAddress! + (blockStart - offset)
                try preadBlocks(object, first: index, into: target, count: runBytes)
                for block in index...runEnd {
                    let at = block * blockSize - blockStart
                    let bytes = UnsafeRawBufferPointer(start: target + at, count: layout.rawLength(ofBlock: block))
                    let actual = crc32c(bytes)
                    if actual != layout.blocks[block].crc {
                        throw damaged(object.id, block: "block \(block)",
                                      reason: crcReason(expected: layout.blocks[block].crc, actual: actual))
                    }
                }
                index = runEnd + 1
                continue
            }
            if workspace == nil { workspace = workspaces.acquire() }
            if coveredWhole {
                let target = UnsafeMutableRawBufferPointer(start: destination.baseAddress! + (blockStart - offset),
                                                           count: blockLength)
                try loadBlock(object, index, workspace!, into: target)
            } else {
                let target = UnsafeMutableRawBufferPointer(rebasing: workspace!.raw[0..<blockLength])
                try loadBlock(object, index, workspace!, into: target)
                let from = max(offset, blockStart)
                let to = min(end, blockStart + blockLength)
                (destination.baseAddress! + (from - offset))
                    .copyMemory(from: target.baseAddress! + (from - blockStart), byteCount: to - from)
            }
            index += 1
        }
    }

    /// Reads block `index` whole into `target` (exactly its raw length), decompressing if
    /// needed, and checks its CRC32C.
    func loadBlock(_ object: OpenObject, _ index: Int, _ workspace: Workspace,
                   into target: UnsafeMutableRawBufferPointer) throws {
        let entry = object.layout.blocks[index]
        if entry.compressed {
            try preadBlocks(object, first: index, into: workspace.stored.baseAddress!, count: entry.storedLength)
            let frame = UnsafeRawBufferPointer(rebasing: workspace.stored[0..<entry.storedLength])
            guard let size = workspace.decompress(frame, into: target), size == target.count else {
                throw damaged(object.id, block: "block \(index)", reason: "zstd frame does not decode to \(target.count) bytes")
            }
        } else {
            try preadBlocks(object, first: index, into: target.baseAddress!, count: target.count)
        }
        let actual = crc32c(UnsafeRawBufferPointer(target))
        if actual != entry.crc {
            throw damaged(object.id, block: "block \(index)", reason: crcReason(expected: entry.crc, actual: actual))
        }
    }

    /// Reads `count` stored bytes starting at block `first`'s payload. A transfer of at least a
    /// block, page-aligned in the file and in memory, bypasses the page cache (O_DIRECT) for its
    /// page-multiple part, unless the store keeps reads in the page cache (`directReads` false):
    /// the caller (the agent's block cache) keeps the bytes itself.
    private func preadBlocks(_ object: OpenObject, first: Int, into target: UnsafeMutableRawPointer, count: Int) throws {
        let fileOffset = object.layout.blocks[first].fileOffset
        let alignment = ChunkFormat.directAlignment
        var done = 0
        if directReads, count >= ChunkFormat.blockSizeBytes, fileOffset % alignment == 0,
           Int(bitPattern: target) % alignment == 0, directIO.isEnabled, let directFD = object.directDescriptor({ openDirect(object.id) })
        {
            let alignedBytes = count / alignment * alignment
            do {
                done = try FileIO.preadFully(directFD, target, alignedBytes, fileOffset)
            } catch let failure where failure.errno == EINVAL {
                directIO.refused("O_DIRECT read: \(failure.description)", logger: logger)
                done = 0
            } catch {
                throw readFailed(object.id, block: "block \(first)", error)
            }
            if done < alignedBytes && directIO.isEnabled {
                throw damaged(object.id, block: "block \(first)", reason: "file ends \(count - done) bytes early")
            }
            if done > 0 { directIO.countRead() }
        }
        let got: Int
        do {
            got = try done + FileIO.preadFully(object.fd, target + done, count - done, fileOffset + done)
        } catch {
            throw readFailed(object.id, block: "block \(first)", error)
        }
        if got != count {
            throw damaged(object.id, block: "block \(first)", reason: "file ends \(count - got) bytes early")
        }
    }

    /// Opens object `id` for O_DIRECT reads; -1 (and direct I/O off when refused) on failure.
    private func openDirect(_ id: SliceID) -> Int32 {
        let fd = FileIO.withObjectPath(id) {
            openat(root, $0, O_RDONLY | O_CLOEXEC | O_DIRECT | (readOnly ? O_NOFOLLOW | O_NONBLOCK : 0))
        }
        if fd < 0 && errno == EINVAL { directIO.refused("open(O_DIRECT): \(String(cString: strerror(errno)))", logger: logger) }
        return fd
    }

    private func crcReason(expected: UInt32, actual: UInt32) -> String {
        "crc32c mismatch (stored \(String(expected, radix: 16)), computed \(String(actual, radix: 16)))"
    }

    func path(of id: SliceID) -> String {
        "\(directory)/\(FileIO.fanOutName(Int(id & 0xFF)))/\(hex(id))"
    }

    /// Logs the one error line for a damaged object and returns the EIO to throw.
    /// A failed `fstat` or `pread` of object `id`: damage when the disk answers EIO, else that
    /// call's own errno (ENOMEM, EISDIR, ...), which is not the object's fault: fsck --repair
    /// deletes damaged objects.
    func readFailed(_ id: SliceID, block: String, _ error: Error) -> WeftError {
        guard let failure = error as? FileIO.Failure, failure.errno != EIO else {
            return damaged(id, block: block, reason: "\(error)")
        }
        logger.error("cannot read chunk \(hex(id)) at \(block): \(failure.description); file \(path(of: id))")
        return WeftError(failure.errno, "cannot read chunk \(hex(id)) at \(block)")
    }

    func damaged(_ id: SliceID, block: String, reason: String) -> WeftError {
        logger.error("chunk \(hex(id)) damaged at \(block): \(reason); file \(path(of: id))",
                     metadata: ["chunk": "\(hex(id))", "path": "\(path(of: id))", "block": "\(block)"])
        return WeftError(EIO, "chunk \(hex(id)) damaged at \(block)")
    }
}

extension ChunkStore {
    /// The stored blocks `[firstBlock, firstBlock + count)` of object `id` (fewer at its end) and
    /// the file span holding them, unread (SPEC.md §4, Stored-block reads): the header was checked
    /// when the object was opened; the blocks are checked by whoever reads the span. ENOENT if
    /// missing, EIO for a damaged header, EINVAL for `count` outside 1...1024 or `firstBlock`
    /// past the last block.
    public func storedBlocks(id: SliceID, firstBlock: Int, count: Int) throws -> StoredBlocks {
        let object = try openObject(id)
        let blocks = object.layout.blocks
        guard count >= 1, count <= StoredBlocks.countMax, firstBlock >= 0, firstBlock < blocks.count else {
            throw WeftError(EINVAL, "blocks \(firstBlock)+\(count) outside chunk \(hex(id)) of \(blocks.count) blocks")
        }
        let range = firstBlock..<min(blocks.count, firstBlock + count)
        let entries = range.map {
            StoredBlockEntry(storedLength: UInt32(blocks[$0].storedLength), crc: blocks[$0].crc,
                             flags: blocks[$0].compressed ? StoredBlockEntry.flagZstd : 0)
        }
        let byteCount = range.reduce(0) { $0 + blocks[$1].storedLength }
        let fileOffset = blocks[firstBlock].fileOffset
        if let span = cachedSpan(object, fileOffset: fileOffset, byteCount: byteCount) {
            return StoredBlocks(id: id, rawLength: object.layout.rawLength, firstBlock: firstBlock, entries: entries,
                                descriptor: object.fd, fileOffset: fileOffset, byteCount: byteCount,
                                memory: span.bytesWithTrailer, keepAlive: SpanHold(span: span, object: object))
        }
        return StoredBlocks(id: id, rawLength: object.layout.rawLength, firstBlock: firstBlock, entries: entries,
                            descriptor: object.fd, fileOffset: fileOffset, byteCount: byteCount, keepAlive: object)
    }

    /// What the read cache did so far; nil when the store has none (SPEC.md §4, Hub read cache).
    public var spanCacheCounters: SpanCacheCounters? { spanCache?.statistics }

    /// Empties the read cache (weftd on SIGUSR1); spans being sent are freed when sent.
    public func dropSpanCache() { spanCache?.removeAll() }

    /// The span from the read cache, read into it on a miss; nil when the store has no cache,
    /// the span does not qualify (not page-aligned in the file, less than a block, too large to
    /// keep, O_DIRECT off or refused for this file) or its read failed: the caller sends it
    /// from the file, which reports any error. The O_DIRECT descriptor is opened only by a miss
    /// that the page cache cannot serve.
    private func cachedSpan(_ object: OpenObject, fileOffset: Int, byteCount: Int) -> SpanCache.Span? {
        guard let spanCache, byteCount >= ChunkFormat.blockSizeBytes, fileOffset % ChunkFormat.directAlignment == 0,
              spanCache.keeps(byteCount: byteCount), object.inode != 0, directIO.isEnabled,
              !object.directRefused else { return nil }
        let key = SpanCache.Key(id: object.id, device: object.device, inode: object.inode, changeNs: object.changeNs,
                                fileOffset: fileOffset, byteCount: byteCount)
        return spanCache.span(key) { target in
            readSpan(object, fileOffset: fileOffset, byteCount: byteCount, into: target)
        }
    }

    /// Reads a span into `target` (page-aligned, at least `SpanCache.capacity` bytes): from the
    /// page cache when it holds all of it, else its page-multiple cover with O_DIRECT, stopping
    /// at the file's end (a short, unaligned transfer). False on any failure.
    private func readSpan(_ object: OpenObject, fileOffset: Int, byteCount: Int,
                          into target: UnsafeMutableRawPointer) -> Bool {
        if weft_pread_cached(object.fd, target, byteCount, fileOffset) == byteCount { return true }
        guard let directFD = object.directDescriptor({ openDirect(object.id) }) else { return false }
        let alignment = ChunkFormat.directAlignment
        let cover = (byteCount + alignment - 1) / alignment * alignment
        var done = 0
        while done < byteCount {
            let count = pread(directFD, target + done, cover - done, off_t(fileOffset + done))
            if count > 0 {
                done += count
                if done % alignment != 0 { break }   // the file's end: another O_DIRECT read would be unaligned
                continue
            }
            if count == 0 { break }
            let error = errno
            if error == EINTR { continue }
            if error == EINVAL { directIO.refused("O_DIRECT read: \(String(cString: strerror(error)))", logger: logger) }
            return false
        }
        guard done >= byteCount else { return false }
        directIO.countRead()
        return true
    }
}

/// What a stored-block span from the read cache keeps alive: its memory, and the open object
/// whose descriptor `StoredBlocks` still names.
private final class SpanHold {
    let span: SpanCache.Span
    let object: OpenObject

    init(span: SpanCache.Span, object: OpenObject) {
        self.span = span
        self.object = object
    }
}
