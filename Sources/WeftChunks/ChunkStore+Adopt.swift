#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import WeftProto

/// Objects a co-located agent writes into this store's directory and the store's owner takes
/// over (SPEC.md §4, Co-located writes): the agent's store (`init(readingFrom:)`) writes the
/// object file under a temporary name of its tag; the owner's store checks its header and
/// gives it its name, as if it had written it.
extension ChunkStore {
    /// Set in every tag of an agent's temporary object; the store's own temporary names never
    /// have it, so that no tag names a file the store is writing.
    public static let adoptedTagBit: UInt32 = 0x8000_0000

    /// Writes object `id` as `write` does, with `compression`, under the temporary name of `tag`
    /// (which must have `adoptedTagBit`): not synced, not linked, not counted, for the store's
    /// owner to take over (`adopt`). Allowed in a store that only reads (`init(readingFrom:)`).
    /// Leaves no file when it throws (ENOSPC, EIO, ...).
    public func writeTemporary(id: SliceID, data: UnsafeRawBufferPointer, tag: UInt32, compression: Compression) throws {
        precondition(tag & Self.adoptedTagBit != 0, "an agent's tag has the top bit set")
        try write(id: id, data: data, finish: .temporary(tag: tag), compression: compression)
    }

    /// Removes the temporary file `writeTemporary` left for `tag`, if it is still there; false
    /// if one is there still (a tag without `adoptedTagBit` is never removed).
    @discardableResult
    public func removeTemporary(id: SliceID, tag: UInt32) -> Bool {
        guard tag & Self.adoptedTagBit != 0 else { return false }
        return removeTemporary(id, suffix: tag)
    }

    /// Takes over the object that a co-located agent wrote under the temporary name of `tag`:
    /// checks its header and length as a read would, and the disk reserve, then links it to its
    /// name and counts, caches and queues it for `sync()` exactly as `write` does. EINVAL: a tag
    /// without `adoptedTagBit`, not a regular file, a raw length over `maxRawLength`; ENOENT:
    /// no such file; EBADMSG: a header that fails its check; EEXIST; ENOSPC. On every failure
    /// but ENOENT and a bad tag the temporary file is removed.
    public func adopt(id: SliceID, tag: UInt32, maxRawLength: Int = Limits.chunkSizeMaxBytes) throws {
        try checkWritable(id)
        guard tag & Self.adoptedTagBit != 0 else {
            throw WeftError(EINVAL, "tag \(String(tag, radix: 16)) of chunk \(hex(id)) is not an agent's")
        }
        let fd = FileIO.withObjectPath(id, suffix: tag) { openat(root, $0, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK) }
        guard fd >= 0 else {
            let code = errno
            if code == ENOENT { throw WeftError(ENOENT, "no object \(hex(id)) written for tag \(String(tag, radix: 16))") }
            removeTemporary(id, suffix: tag)
            throw WeftError(code == ELOOP ? EINVAL : code, "cannot open the agent's object \(hex(id)): \(String(cString: strerror(code)))")
        }
        func refuse(_ error: WeftError) -> WeftError {
            close(fd)
            removeTemporary(id, suffix: tag)
            return error
        }
        var status = stat()
        guard fstat(fd, &status) == 0, (status.st_mode & S_IFMT) == S_IFREG else {
            throw refuse(WeftError(EINVAL, "the agent's object \(hex(id)) is not a regular file"))
        }
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
        let layout: ChunkLayout
        do {
            layout = try readLayout(fd, id, adopting: true)
        } catch let error as WeftError {
            let temporary = FileIO.withObjectPath(id, suffix: tag) { String(cString: $0) }
            logger.error("refused an agent's chunk \(hex(id)): \(error.message); file \(directory)/\(temporary)")
            throw refuse(error.errno == EBADMSG ? WeftError(EBADMSG, "the agent's chunk \(hex(id)) fails its check: \(error.message)")
                                                : error)
        } catch {
            throw refuse(WeftError(EIO, "the agent's chunk \(hex(id)): \(error)"))
        }
        guard layout.rawLength <= maxRawLength else {
            throw refuse(WeftError(EINVAL, "slice larger than a chunk (\(layout.rawLength) bytes, at most \(maxRawLength))"))
        }
        do {
            try checkReserve(id, bytes: 0)
            try placeTemporary(id, suffix: tag)
        } catch {
            throw refuse(error as? WeftError ?? WeftError(EIO, "the agent's chunk \(hex(id)): \(error)"))
        }
        try written(id, fd: fd, layout: layout)
    }
}
