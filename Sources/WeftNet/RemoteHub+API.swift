#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import NIOCore
import WeftChunks
import WeftProto

/// The `HubAPI` methods of `RemoteHub`: each builds its request, calls, and unpacks the result.
extension RemoteHub {
    public func lookup(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws -> Attributes {
        try attributes(.lookup(context, parent: parent, name: name))
    }

    public func getattr(_ context: RequestContext, ino: InodeID) throws -> Attributes {
        try attributes(.getattr(context, ino: ino))
    }

    public func setattr(_ context: RequestContext, ino: InodeID, _ changes: SetAttributes) throws -> Attributes {
        try attributes(.setattr(context, ino: ino, changes))
    }

    public func create(_ context: RequestContext, parent: InodeID, name: [UInt8], mode: UInt32, rdev: UInt32,
                       umask: UInt32, exclusive: Bool) throws -> Attributes {
        try attributes(.create(context, parent: parent, name: name, mode: mode, rdev: rdev, umask: umask, exclusive: exclusive))
    }

    public func createOpen(_ context: RequestContext, parent: InodeID, name: [UInt8], mode: UInt32, umask: UInt32,
                           flags: Int32, writeLease: Bool) throws -> CreatedFile {
        let request = HubRequest.createOpen(context, parent: parent, name: name, mode: mode, umask: umask, flags: flags,
                                            writeLease: writeLease)
        return try call(request, unpack: { if case let .created(created) = $0 { created } else { nil } }) {
            try createOpenBySteps(context, parent: parent, name: name, mode: mode, umask: umask, flags: flags,
                                  writeLease: writeLease)
        }
    }

    public func mkdir(_ context: RequestContext, parent: InodeID, name: [UInt8], mode: UInt32, umask: UInt32) throws -> Attributes {
        try attributes(.mkdir(context, parent: parent, name: name, mode: mode, umask: umask))
    }

    public func unlink(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws {
        try empty(.unlink(context, parent: parent, name: name))
    }

    public func unlinkEntry(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws -> Attributes? {
        try call(.unlinkEntry(context, parent: parent, name: name),
                 unpack: { if case let .unlinked(after) = $0 { after } else { nil } }) {
            try unlinkEntryBySteps(context, parent: parent, name: name)
        }
    }

    public func rmdir(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws {
        try empty(.rmdir(context, parent: parent, name: name))
    }

    public func symlink(_ context: RequestContext, parent: InodeID, name: [UInt8], target: [UInt8]) throws -> Attributes {
        try attributes(.symlink(context, parent: parent, name: name, target: target))
    }

    public func readlink(_ context: RequestContext, ino: InodeID) throws -> [UInt8] {
        try bytes(.readlink(context, ino: ino))
    }

    public func link(_ context: RequestContext, ino: InodeID, newParent: InodeID, newName: [UInt8]) throws -> Attributes {
        try attributes(.link(context, ino: ino, newParent: newParent, newName: newName))
    }

    public func rename(_ context: RequestContext, parent: InodeID, name: [UInt8], newParent: InodeID, newName: [UInt8],
                       flags: RenameFlags) throws {
        try empty(.rename(context, parent: parent, name: name, newParent: newParent, newName: newName, flags: flags))
    }

    public func readdir(_ context: RequestContext, ino: InodeID, after: [UInt8]?, limit: Int) throws -> [DirectoryEntry] {
        guard limit >= 0 else { throw WeftError(EINVAL, "readdir limit \(limit) is negative") }
        let request = HubRequest.readdir(context, ino: ino, after: after, limit: UInt32(clamping: limit))
        guard case let .entries(entries) = try call(request) else { throw shapeMismatch(.readdir) }
        return entries
    }

    public func access(_ context: RequestContext, ino: InodeID, mask: UInt32) throws {
        try empty(.access(context, ino: ino, mask: mask))
    }

    public func open(_ context: RequestContext, ino: InodeID, flags: Int32) throws -> Attributes {
        try attributes(.open(context, ino: ino, flags: flags))
    }

    /// One call (opcode 53); to a hub older than it, `open` and no chunk lists or bytes (the
    /// agent fetches them with its first read).
    public func openLayout(_ context: RequestContext, ino: InodeID, flags: Int32, chunkCount: UInt32,
                           dataMaxBytes: UInt32) throws -> OpenedLayout {
        let request = HubRequest.openLayout(context, ino: ino, flags: flags, chunkCount: chunkCount, dataMaxBytes: dataMaxBytes)
        return try call(request, unpack: { response -> OpenedLayout? in
            if case let .openedLayout(opened) = response { return opened }
            return nil
        }, fallback: { OpenedLayout(attributes: try open(context, ino: ino, flags: flags), chunks: [], data: []) })
    }

    public func release(_ context: RequestContext, ino: InodeID) throws {
        try empty(.release(context, ino: ino))
    }

    /// One call (opcode 48); to a hub older than it, one `release` each.
    public func releaseMany(_ context: RequestContext, inos: [InodeID]) throws {
        try call(.releaseMany(context, inos: inos), unpack: { if case .empty = $0 { () } else { nil } }) {
            for ino in inos { try release(context, ino: ino) }
        }
    }

    public func getxattr(_ context: RequestContext, ino: InodeID, name: [UInt8]) throws -> [UInt8] {
        try bytes(.getxattr(context, ino: ino, name: name))
    }

    public func setxattr(_ context: RequestContext, ino: InodeID, name: [UInt8], value: [UInt8], flags: XattrFlags) throws {
        try empty(.setxattr(context, ino: ino, name: name, value: value, flags: flags))
    }

    public func listxattr(_ context: RequestContext, ino: InodeID) throws -> [[UInt8]] {
        guard case let .names(names) = try call(.listxattr(context, ino: ino)) else { throw shapeMismatch(.listxattr) }
        return names
    }

    public func removexattr(_ context: RequestContext, ino: InodeID, name: [UInt8]) throws {
        try empty(.removexattr(context, ino: ino, name: name))
    }

    public func statfs(_ context: RequestContext) throws -> FileSystemStats {
        guard case let .fileSystemStats(stats) = try call(.statfs(context)) else { throw shapeMismatch(.statfs) }
        return stats
    }

    public func allocateSliceIDs(_ context: RequestContext, count: UInt32) throws -> SliceID {
        guard case let .firstSliceID(id) = try call(.allocateSliceIDs(context, count: count)) else {
            throw shapeMismatch(.allocateSliceIDs)
        }
        return id
    }

    public func writeSlice(_ context: RequestContext, id: SliceID, data: [UInt8]) throws {
        if localWrites, !data.isEmpty, try data.withUnsafeBytes({ try writeLocally(context, id: id, bytes: $0) }) { return }
        try empty(.writeSlice(context, id: id, data: data))
    }

    public func readSlice(_ context: RequestContext, id: SliceID, offset: UInt32, length: UInt32) throws -> [UInt8] {
        try bytes(.readSlice(context, id: id, offset: offset, length: length))
    }

    /// Sends the data from `bytes` itself, after the frame's start (SPEC.md §4, Bulk transfers).
    /// In a session on a zstd volume the object goes compressed, as `writeObject` from its image
    /// (SPEC.md §4, Compressed uploads); raw when nothing shrank, and after the hub refused an
    /// image (EBADMSG, logged) or the opcode (ENOSYS), until the next connection.
    public func writeSlice(_ context: RequestContext, id: SliceID, bytes: UnsafeRawBufferPointer) throws {
        if localWrites, !bytes.isEmpty, try writeLocally(context, id: id, bytes: bytes) { return }
        if compressUploads, !bytes.isEmpty, bytes.count <= Limits.chunkSizeMaxBytes,
           compressingSessions.withLock({ $0.contains(context.session) }),
           !unknownOpcodes.withLock({ $0.contains(.writeObject) }) {
            let sent: Bool = try ChunkImage.withCompressed(id: id, data: bytes) { image in
                guard let image else { return false }
                do {
                    try writeObject(context, id: id, image: image)
                    compressedObjects.add(1, ordering: .relaxed)
                    compressedRawBytes.add(bytes.count, ordering: .relaxed)
                    compressedImageBytes.add(image.count, ordering: .relaxed)
                    return true
                } catch let error as WeftError where error.errno == ENOSYS {
                    unknownOpcodes.withLock { _ = $0.insert(.writeObject) }
                    return false
                } catch let error as WeftError where error.errno == EBADMSG {
                    // Raw from now on, until the next connection: a hub that refuses one image
                    // may refuse them all (a format it does not read).
                    unknownOpcodes.withLock { _ = $0.insert(.writeObject) }
                    logger.error("the hub refused a compressed object; sending objects uncompressed on this connection",
                                 metadata: ["hub": "\(address)", "chunk": "\(hex(id))", "error": "\(error)"])
                    return false
                }
            }
            if sent { return }
        }
        try send(.writeSlice(context, id: id, data: []), opcode: .writeSlice, payload: bytes)
    }

    public func adoptObject(_ context: RequestContext, id: SliceID, tag: UInt32) throws {
        try empty(.adoptObject(context, id: id, tag: tag))
    }

    /// Sends `image` from the caller's memory, after the frame's start (as `writeSlice`).
    public func writeObject(_ context: RequestContext, id: SliceID, image: UnsafeRawBufferPointer) throws {
        try send(.writeObject(context, id: id, image: []), opcode: .writeObject, payload: image)
    }

    /// A request whose trailing bulk bytes (`writeSlice`'s data, `writeObject`'s image) go from
    /// `payload` itself after the frame's start; answered with no result.
    private func send(_ request: HubRequest, opcode: HubOpcode, payload: UnsafeRawBufferPointer) throws {
        let response = try call(request, encode: { requestID, request, allocator in
            let sent: RequestContext, sliceID: SliceID
            switch request {
            case let .writeSlice(c, i, _), let .writeObject(c, i, _): (sent, sliceID) = (c, i)
            default: preconditionFailure("not a bulk write")
            }
            return try WireCodec.writeSliceRequestHead(id: requestID, opcode: opcode, context: sent, sliceID: sliceID,
                                                       count: payload.count, allocator: allocator)
        }, decode: Self.decodeResponse, payload: payload)
        guard case .empty = response else { throw shapeMismatch(opcode) }
    }

    /// Copies the reply's bytes straight from the receive buffer into `destination`. A read of
    /// whole blocks from a block boundary asks for the stored blocks (opcode 49), which the hub
    /// sends from its page cache unread, and checks them here (SPEC.md §4, Stored-block reads).
    public func readSlice(_ context: RequestContext, id: SliceID, offset: UInt32,
                          into destination: UnsafeMutableRawBufferPointer) throws {
        if localReads, try readLocally(context, id: id, offset: offset, into: destination) { return }
        let blockSize = Limits.blockSizeBytes
        if Int(offset) % blockSize == 0, destination.count >= blockSize, destination.count <= Limits.transferMaxBytes,
           !unknownOpcodes.withLock({ $0.contains(.readBlocks) }) {
            do {
                return try readBlocks(context, id: id, firstBlock: Int(offset) / blockSize, into: destination)
            } catch let error as WeftError where error.errno == ENOSYS {
                unknownOpcodes.withLock { _ = $0.insert(.readBlocks) }
            } catch let damage as DamagedStoredBlock {
                // A block that failed its check here: once more through `readSlice`, which the
                // hub checks itself, so the damage is logged there, and a cluster hub replaces a
                // damaged cached copy from a good one. Other failures (the connection, the hub's
                // own answers) are not asked again.
                logger.warning("a stored block failed its check: reading it through the hub's check",
                               metadata: ["hub": "\(address)", "chunk": "\(hex(id))", "error": "\(damage.error)"])
                let request = HubRequest.readSlice(context, id: id, offset: offset, length: UInt32(clamping: destination.count))
                do {
                    return try readSlice(request, into: destination)
                } catch let again as WeftError where again.errno == EIO {
                    throw damage.error   // the first account: where the damage was seen
                }
            }
        }
        try readSliceChecked(context, id: id, offset: offset, into: destination)
    }

    /// `readSlice` (opcode 25): the hub reads and checks the bytes itself.
    func readSliceChecked(_ context: RequestContext, id: SliceID, offset: UInt32,
                          into destination: UnsafeMutableRawBufferPointer) throws {
        try readSlice(.readSlice(context, id: id, offset: offset, length: UInt32(clamping: destination.count)), into: destination)
    }

    /// The blocks covering `destination` from `firstBlock` on, sent stored (`readBlocks`): the
    /// event loop copies their stored bytes into `destination` (or a buffer of their own when
    /// they do not fit), and this thread checks and places them.
    private func readBlocks(_ context: RequestContext, id: SliceID, firstBlock: Int,
                            into destination: UnsafeMutableRawBufferPointer) throws {
        let count = (destination.count + Limits.blockSizeBytes - 1) / Limits.blockSizeBytes
        let request = HubRequest.readBlocks(context, id: id, firstBlock: UInt32(firstBlock), count: UInt32(count))
        let direct = DirectDecoder<StoredBlocksReply>(shape: .storedBlocks, destination: destination) { head, tail in
            try WireCodec.decodeStoredBlocks(head: head, tail: tail, id: id, firstBlock: firstBlock,
                                             readBytes: destination.count)
        }
        let reply = try call(request, encode: Self.encodeRequest, decode: { opcode, payload in
            try WireCodec.decodeStoredBlocks(opcode: opcode, payload: payload, id: id, firstBlock: firstBlock,
                                             into: destination)
        }, decodeOnLoop: true, direct: direct)
        storedBlockReads.add(1, ordering: .relaxed)
        // The entries passed `StoredBlockDecoder.check` on the event loop: what can fail now is
        // a damaged block (EIO).
        do {
            if let staged = reply.staged {
                try staged.withUnsafeBytes { stored in
                    try StoredBlockDecoder.decode(id: id, firstBlock: firstBlock, rawLength: reply.rawLength,
                                                  entries: reply.entries, stored: stored, into: destination, logger: logger)
                }
            } else {
                let stored = UnsafeRawBufferPointer(start: destination.baseAddress, count: reply.byteCount)
                try StoredBlockDecoder.decode(id: id, firstBlock: firstBlock, rawLength: reply.rawLength,
                                              entries: reply.entries, stored: stored, into: destination, logger: logger)
            }
        } catch let error as WeftError {
            throw DamagedStoredBlock(error: error)
        }
    }

    /// A stored block that failed its check (CRC32C, or a compressed block that does not
    /// decode) at this agent.
    private struct DamagedStoredBlock: Error {
        let error: WeftError
    }

    private func readSlice(_ request: HubRequest, into destination: UnsafeMutableRawBufferPointer) throws {
        // The reading thread takes a reply straight into `destination` only when its count is
        // exactly the destination's (and the status 0): nothing is left to check then.
        let direct = DirectDecoder<Void>(shape: .bytes, destination: destination) { _, _ in .success(()) }
        try call(request, encode: Self.encodeRequest, decode: { opcode, payload in
            try WireCodec.decodeBulkResponse(opcode: opcode, payload: payload, into: destination)
        }, decodeOnLoop: true, direct: direct)
    }

    public func layout(_ context: RequestContext, ino: InodeID, firstChunk: UInt32, count: UInt32) throws -> (Attributes, [[Slice]]) {
        let request = HubRequest.layout(context, ino: ino, firstChunk: firstChunk, count: count)
        guard case let .layout(attributes, chunks) = try call(request) else { throw shapeMismatch(.layout) }
        return (attributes, chunks)
    }

    public func commitSlices(_ context: RequestContext, ino: InodeID, slices: [SliceCommit], minimumSize: UInt64,
                             durable: Bool) throws -> Attributes {
        try attributes(.commitSlices(context, ino: ino, slices: slices, minimumSize: minimumSize, durable: durable))
    }

    public func sync(_ context: RequestContext) throws {
        try empty(.sync(context))
    }

    /// `syncFile`; to a hub older than it (ENOSYS), `sync`, which reports the session's failures
    /// rather than the file's.
    public func syncFile(_ context: RequestContext, ino: InodeID) throws {
        try call(.syncFile(context, ino: ino), unpack: { response -> Void? in
            if case .empty = response { return () }
            return nil
        }, fallback: { try sync(context) })
    }

    /// Waits until every commit of `ino` by this agent that the hub read before this call
    /// has finished (SPEC.md §4, Barriers). An older hub's ENOSYS counts as done: it has no
    /// barrier to offer.
    public func barrier(_ context: RequestContext, ino: InodeID) throws {
        do {
            try empty(.barrier(context, ino: ino))
        } catch let error as WeftError where error.errno == ENOSYS {}
    }

    public func lock(_ context: RequestContext, ino: InodeID, _ request: LockRequest) throws -> LockDescription {
        guard case let .lock(description) = try call(.lock(context, ino: ino, request)) else { throw shapeMismatch(.lock) }
        return description
    }

    public func clusterMap() throws -> [UInt8] {
        guard case let .bytes(json) = try call(.clusterMap) else { throw shapeMismatch(.clusterMap) }
        return json
    }

    public func createVolume(name: String, home: String, chunkSizeBytes: UInt32, compression: Compression) throws -> [UInt8] {
        let request = HubRequest.createVolume(name: name, home: home, chunkSizeBytes: chunkSizeBytes, compression: compression)
        guard case let .bytes(json) = try call(request) else { throw shapeMismatch(.createVolume) }
        return json
    }

    public func readSlice(_ context: RequestContext, id: SliceID, offset: UInt32, length: UInt32,
                          holders: [UInt16]) throws -> [UInt8] {
        // Without holders the plain opcode: a single hub (or an older one) serves it the same.
        if holders.isEmpty { return try readSlice(context, id: id, offset: offset, length: length) }
        return try bytes(.readSliceFrom(context, id: id, offset: offset, length: length, holders: holders))
    }

    public func readSlice(_ context: RequestContext, id: SliceID, offset: UInt32, holders: [UInt16],
                          into destination: UnsafeMutableRawBufferPointer) throws {
        if holders.isEmpty { return try readSlice(context, id: id, offset: offset, into: destination) }
        try readSlice(.readSliceFrom(context, id: id, offset: offset, length: UInt32(clamping: destination.count), holders: holders),
                      into: destination)
    }

    public func fetchObject(id: SliceID, offset: UInt32, length: UInt32) throws -> (fileBytes: UInt32, bytes: [UInt8]) {
        guard case let .objectPart(fileBytes, bytes) = try call(.fetchObject(id: id, offset: offset, length: length)) else {
            throw shapeMismatch(.fetchObject)
        }
        return (fileBytes, bytes)
    }

    public func deleteObjects(ids: [SliceID]) throws {
        try empty(.deleteObjects(ids: ids))
    }

    public func releaseUploads(_ context: RequestContext, ids: [SliceID]) throws {
        try empty(.releaseUploads(context, ids: ids))
    }

    public func discardUploads(_ context: RequestContext, ids: [SliceID]) throws {
        try empty(.discardUploads(context, ids: ids))
    }

    public func status() throws -> HubStatus {
        guard case let .status(status) = try call(.status) else { throw shapeMismatch(.status) }
        return status
    }

    /// `fsckRemaining`; to a hub older than it (ENOSYS), `fsck`, whose report has no
    /// `remaining` (nil: the caller counts every problem as remaining).
    public func fsck(repair: Bool) throws -> FsckReport {
        try call(.fsckRemaining(repair: repair), unpack: { response -> FsckReport? in
            if case let .fsckResult(report) = response { return report }
            return nil
        }, fallback: {
            guard case let .fsckReport(report) = try call(.fsck(repair: repair)) else { throw shapeMismatch(.fsck) }
            return report
        })
    }

    private func attributes(_ request: HubRequest) throws -> Attributes {
        guard case let .attributes(attributes) = try call(request) else { throw shapeMismatch(request.opcode) }
        return attributes
    }

    private func bytes(_ request: HubRequest) throws -> [UInt8] {
        guard case let .bytes(bytes) = try call(request) else { throw shapeMismatch(request.opcode) }
        return bytes
    }

    private func empty(_ request: HubRequest) throws {
        guard case .empty = try call(request) else { throw shapeMismatch(request.opcode) }
    }
}
