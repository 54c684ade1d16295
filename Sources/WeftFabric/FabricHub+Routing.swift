#if canImport(Glibc)
import Glibc
#endif
import WeftChunks
import WeftHub
import WeftProto

/// Every per-volume call goes to the hub of the caller's session, with the inner session id.
extension FabricHub {
    public func lookup(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws -> Attributes {
        let (hub, c) = try route(context)
        return try hub.lookup(c, parent: parent, name: name)
    }

    public func getattr(_ context: RequestContext, ino: InodeID) throws -> Attributes {
        let (hub, c) = try route(context)
        return try hub.getattr(c, ino: ino)
    }

    public func setattr(_ context: RequestContext, ino: InodeID, _ changes: SetAttributes) throws -> Attributes {
        let (hub, c) = try route(context)
        return try hub.setattr(c, ino: ino, changes)
    }

    public func create(_ context: RequestContext, parent: InodeID, name: [UInt8], mode: UInt32, rdev: UInt32,
                       umask: UInt32, exclusive: Bool) throws -> Attributes {
        let (hub, c) = try route(context)
        return try hub.create(c, parent: parent, name: name, mode: mode, rdev: rdev, umask: umask, exclusive: exclusive)
    }

    public func unlinkEntry(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws -> Attributes? {
        let (hub, c) = try route(context)
        return try hub.unlinkEntry(c, parent: parent, name: name)
    }

    public func createOpen(_ context: RequestContext, parent: InodeID, name: [UInt8], mode: UInt32, umask: UInt32,
                           flags: Int32, writeLease: Bool) throws -> CreatedFile {
        let (hub, c) = try route(context)
        return try hub.createOpen(c, parent: parent, name: name, mode: mode, umask: umask, flags: flags,
                                  writeLease: writeLease)
    }

    public func mkdir(_ context: RequestContext, parent: InodeID, name: [UInt8], mode: UInt32, umask: UInt32) throws -> Attributes {
        let (hub, c) = try route(context)
        return try hub.mkdir(c, parent: parent, name: name, mode: mode, umask: umask)
    }

    public func unlink(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws {
        let (hub, c) = try route(context)
        try hub.unlink(c, parent: parent, name: name)
    }

    public func rmdir(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws {
        let (hub, c) = try route(context)
        try hub.rmdir(c, parent: parent, name: name)
    }

    public func symlink(_ context: RequestContext, parent: InodeID, name: [UInt8], target: [UInt8]) throws -> Attributes {
        let (hub, c) = try route(context)
        return try hub.symlink(c, parent: parent, name: name, target: target)
    }

    public func readlink(_ context: RequestContext, ino: InodeID) throws -> [UInt8] {
        let (hub, c) = try route(context)
        return try hub.readlink(c, ino: ino)
    }

    public func link(_ context: RequestContext, ino: InodeID, newParent: InodeID, newName: [UInt8]) throws -> Attributes {
        let (hub, c) = try route(context)
        return try hub.link(c, ino: ino, newParent: newParent, newName: newName)
    }

    public func rename(_ context: RequestContext, parent: InodeID, name: [UInt8], newParent: InodeID, newName: [UInt8],
                       flags: RenameFlags) throws {
        let (hub, c) = try route(context)
        try hub.rename(c, parent: parent, name: name, newParent: newParent, newName: newName, flags: flags)
    }

    public func readdir(_ context: RequestContext, ino: InodeID, after: [UInt8]?, limit: Int) throws -> [DirectoryEntry] {
        let (hub, c) = try route(context)
        return try hub.readdir(c, ino: ino, after: after, limit: limit)
    }

    public func access(_ context: RequestContext, ino: InodeID, mask: UInt32) throws {
        let (hub, c) = try route(context)
        try hub.access(c, ino: ino, mask: mask)
    }

    public func open(_ context: RequestContext, ino: InodeID, flags: Int32) throws -> Attributes {
        let (hub, c) = try route(context)
        return try hub.open(c, ino: ino, flags: flags)
    }

    public func openLayout(_ context: RequestContext, ino: InodeID, flags: Int32, chunkCount: UInt32,
                           dataMaxBytes: UInt32) throws -> OpenedLayout {
        let (hub, c) = try route(context)
        return try hub.openLayout(c, ino: ino, flags: flags, chunkCount: chunkCount, dataMaxBytes: dataMaxBytes)
    }

    public func release(_ context: RequestContext, ino: InodeID) throws {
        let (hub, c) = try route(context)
        try hub.release(c, ino: ino)
    }

    public func releaseMany(_ context: RequestContext, inos: [InodeID]) throws {
        let (hub, c) = try route(context)
        try hub.releaseMany(c, inos: inos)
    }

    public func getxattr(_ context: RequestContext, ino: InodeID, name: [UInt8]) throws -> [UInt8] {
        let (hub, c) = try route(context)
        return try hub.getxattr(c, ino: ino, name: name)
    }

    public func setxattr(_ context: RequestContext, ino: InodeID, name: [UInt8], value: [UInt8], flags: XattrFlags) throws {
        let (hub, c) = try route(context)
        try hub.setxattr(c, ino: ino, name: name, value: value, flags: flags)
    }

    public func listxattr(_ context: RequestContext, ino: InodeID) throws -> [[UInt8]] {
        let (hub, c) = try route(context)
        return try hub.listxattr(c, ino: ino)
    }

    public func removexattr(_ context: RequestContext, ino: InodeID, name: [UInt8]) throws {
        let (hub, c) = try route(context)
        try hub.removexattr(c, ino: ino, name: name)
    }

    public func statfs(_ context: RequestContext) throws -> FileSystemStats {
        let (hub, c) = try route(context)
        return try hub.statfs(c)
    }

    public func allocateSliceIDs(_ context: RequestContext, count: UInt32) throws -> SliceID {
        let (hub, c) = try route(context)
        return try hub.allocateSliceIDs(c, count: count)
    }

    public func writeSlice(_ context: RequestContext, id: SliceID, data: [UInt8]) throws {
        try data.withUnsafeBytes { try writeSlice(context, id: id, bytes: $0) }
    }

    public func writeSlice(_ context: RequestContext, id: SliceID, bytes: UnsafeRawBufferPointer) throws {
        if let session = dataSession(context) { return try writeData(session, context, id: id, bytes: bytes) }
        let (hub, c) = try route(context)
        try hub.writeSlice(c, id: id, bytes: bytes)
    }

    public func writeObject(_ context: RequestContext, id: SliceID, image: UnsafeRawBufferPointer) throws {
        if let session = dataSession(context) { return try writeData(session, context, id: id, image: image) }
        let (hub, c) = try route(context)
        try hub.writeObject(c, id: id, image: image)
    }

    public func readSlice(_ context: RequestContext, id: SliceID, offset: UInt32, length: UInt32) throws -> [UInt8] {
        try readSlice(context, id: id, offset: offset, length: length, holders: [])
    }

    public func readSlice(_ context: RequestContext, id: SliceID, offset: UInt32,
                          into destination: UnsafeMutableRawBufferPointer) throws {
        try readSlice(context, id: id, offset: offset, holders: [], into: destination)
    }

    public func readSlice(_ context: RequestContext, id: SliceID, offset: UInt32, length: UInt32,
                          holders: [UInt16]) throws -> [UInt8] {
        guard length <= UInt32(Limits.transferMaxBytes) else { throw WeftError.invalid }
        return try [UInt8](unsafeUninitializedCapacity: Int(length)) { buffer, initialized in
            try readSlice(context, id: id, offset: offset, holders: holders,
                          into: UnsafeMutableRawBufferPointer(buffer))
            initialized = Int(length)
        }
    }

    /// Any session reads through this hub's stores: the volume's `chunks/`, then `cache/`, then
    /// a fetch from the holders (SPEC.md §12.5).
    public func readSlice(_ context: RequestContext, id: SliceID, offset: UInt32, holders: [UInt16],
                          into destination: UnsafeMutableRawBufferPointer) throws {
        let volume = try readVolume(context, id: id)
        try readThrough(volume, id: id, offset: offset, holders: holders, into: destination)
    }

    /// The stored blocks of an object in this hub's stores: the volume's `chunks/`, then
    /// `cache/`, fetched into the cache from the home first when neither has it, as `readSlice`
    /// does (SPEC.md §4, Stored-block reads; §12.5). Unchecked, like a hub's: the reader checks
    /// them, and reads a block that fails through `readSlice`, which checks here and replaces a
    /// damaged cached copy.
    public func storedBlocks(_ context: RequestContext, id: SliceID, firstBlock: Int, count: Int) throws -> StoredBlocks {
        // Checked before anything is fetched (the store checks the rest against the object).
        guard firstBlock >= 0, (1...StoredBlocks.countMax).contains(count) else {
            throw WeftError(EINVAL, "readBlocks of \(count) blocks from block \(firstBlock)")
        }
        let volume = try readVolume(context, id: id)
        do {
            return try volume.chunks.storedBlocks(id: id, firstBlock: firstBlock, count: count)
        } catch let error as WeftError where error.errno == ENOENT {}
        for attempt in 1...2 {
            do {
                let blocks = try volume.cache.storedBlocks(id: id, firstBlock: firstBlock, count: count)
                readThrough.touched(id)
                return blocks
            } catch let error as WeftError where error.errno == ENOENT {
                // Not cached (or evicted meanwhile): fetch below.
            }
            guard attempt == 1 else { break }
            try readThrough.fetch(id, ReadThrough.Target(volumeID: volume.id, cache: volume.cache,
                                                         sources: sources(volume.id, holders: [])))
        }
        throw WeftError(EIO, "chunk \(hex(id)) was evicted from the cache as it was fetched")
    }

    /// The volume a read of object `id` for `context` is served from; EINVAL for an id of
    /// another volume.
    private func readVolume(_ context: RequestContext, id: SliceID) throws -> VolumeData {
        let volume: VolumeData
        if let session = dataSession(context) {
            volume = session.volume
        } else {
            let volumeID = try volumeID(ofSession: context)
            guard let record = member.map.volume(id: volumeID) else {
                throw WeftError(ESTALE, "volume \(volumeID) is no longer in the cluster map")
            }
            volume = try volumeData(record)
        }
        guard id >> 48 == UInt64(volume.id) else { throw WeftError(EINVAL, "slice id \(id) is not of volume \(volume.id)") }
        return volume
    }

    public func releaseUploads(_ context: RequestContext, ids: [SliceID]) throws {
        guard let session = dataSession(context) else { return }
        session.volume.committed(ids, session: context.session)
    }

    public func discardUploads(_ context: RequestContext, ids: [SliceID]) throws {
        try Limits.checkDiscardUploads(ids.count)
        if let session = dataSession(context) { return try session.volume.discard(ids, session: context.session) }
        let (hub, c) = try route(context)
        try hub.discardUploads(c, ids: ids)
    }

    public func layout(_ context: RequestContext, ino: InodeID, firstChunk: UInt32, count: UInt32) throws -> (Attributes, [[Slice]]) {
        let (hub, c) = try route(context)
        return try hub.layout(c, ino: ino, firstChunk: firstChunk, count: count)
    }

    public func commitSlices(_ context: RequestContext, ino: InodeID, slices: [SliceCommit], minimumSize: UInt64,
                             durable: Bool) throws -> Attributes {
        let (hub, c) = try route(context)
        return try hub.commitSlices(c, ino: ino, slices: slices, minimumSize: minimumSize, durable: durable)
    }

    public func sync(_ context: RequestContext) throws {
        if let session = dataSession(context) {
            do {
                try session.volume.chunks.sync()
            } catch {
                _ = session.volume.chunks.takeFailure(session: context.session)   // this error is the report
                throw error
            }
            // The agent's commit at the home relies on this sync: after a failed pass over an
            // object this session wrote, every upload of it not yet committed is in doubt, and
            // the agent writes them all again (ESTALE; SPEC.md §3.2, §7).
            if session.volume.chunks.takeFailure(session: context.session) {
                throw WeftError(ESTALE, "a chunk sync of data this session wrote failed: write it again")
            }
            return
        }
        let (hub, c) = try route(context)
        try hub.sync(c)
    }

    /// A data session keeps no per-file reports (its objects have no inode): as `sync`.
    public func syncFile(_ context: RequestContext, ino: InodeID) throws {
        if dataSession(context) != nil { return try sync(context) }
        let (hub, c) = try route(context)
        try hub.syncFile(c, ino: ino)
    }

    public func lock(_ context: RequestContext, ino: InodeID, _ request: LockRequest) throws -> LockDescription {
        let (hub, c) = try route(context)
        return try hub.lock(c, ino: ino, request)
    }
}

// MARK: Leases (SPEC.md §12.6): held at the volume's hub, under the inner session.
extension FabricHub {
    public func enableLeases(_ session: SessionID, client: LeaseClient) throws {
        let (hub, c) = try route(RequestContext(session: session, credentials: .root))
        try hub.enableLeases(c.session, client: client)
    }

    public func acquireWriteLease(_ context: RequestContext, ino: InodeID) throws -> Bool {
        let (hub, c) = try route(context)
        return try hub.acquireWriteLease(c, ino: ino)
    }

    public func reclaimWriteLease(_ context: RequestContext, ino: InodeID) throws -> Bool {
        let (hub, c) = try route(context)
        return try hub.reclaimWriteLease(c, ino: ino)
    }
}
