#if canImport(Glibc)
import Glibc
#endif

/// The one boundary between a node agent and its hub.
///
/// The agent reaches the hub only through this protocol. It is implemented in-process
/// (`WeftHub.Hub`, for the embedded default and tests) and over the network
/// (`WeftNet.RemoteHub`, SwiftNIO TCP or Unix socket); both pass the same test suite.
///
/// Contract for every method:
/// - it is safe to call from many threads at once;
/// - it either completes, or throws `WeftError` with the errno a local file system would return;
///   a transport failure throws `EIO`/`ETIMEDOUT` after a bounded wait, never hangs;
/// - a namespace mutation is atomic and durable when it returns;
/// - permission checks use `context.credentials`, evaluated by the hub.
public protocol HubAPI: AnyObject, Sendable {
    // Sessions
    /// Opens an agent session; `agentName` is shown by `weft status`.
    func openSession(agentName: String) throws -> (SessionID, VolumeInfo)
    /// Ends a session: its open-file references are dropped (unlinked open files are reclaimed).
    func closeSession(_ session: SessionID) throws

    // Namespace
    func lookup(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws -> Attributes
    func getattr(_ context: RequestContext, ino: InodeID) throws -> Attributes
    func setattr(_ context: RequestContext, ino: InodeID, _ changes: SetAttributes) throws -> Attributes
    /// Creates a regular file, fifo, socket or device node. With `exclusive` false an existing
    /// regular file is returned instead of EEXIST (the caller handles O_EXCL semantics).
    func create(_ context: RequestContext, parent: InodeID, name: [UInt8], mode: UInt32, rdev: UInt32,
                umask: UInt32, exclusive: Bool) throws -> Attributes
    func mkdir(_ context: RequestContext, parent: InodeID, name: [UInt8], mode: UInt32, umask: UInt32) throws -> Attributes
    func unlink(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws
    /// `unlink`, returning the parent directory's attributes after the change (one round trip
    /// for a caller that keeps them, SPEC.md §4 opcode 46), read inside the change and with a
    /// lease on the parent for the caller; nil where the hub cannot do that in one call.
    func unlinkEntry(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws -> Attributes?
    func rmdir(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws
    func symlink(_ context: RequestContext, parent: InodeID, name: [UInt8], target: [UInt8]) throws -> Attributes
    func readlink(_ context: RequestContext, ino: InodeID) throws -> [UInt8]
    func link(_ context: RequestContext, ino: InodeID, newParent: InodeID, newName: [UInt8]) throws -> Attributes
    func rename(_ context: RequestContext, parent: InodeID, name: [UInt8], newParent: InodeID, newName: [UInt8],
                flags: RenameFlags) throws
    /// Entries of directory `ino` in name order, strictly after `after` (nil: from the start,
    /// including "." and ".."), at most `limit`.
    func readdir(_ context: RequestContext, ino: InodeID, after: [UInt8]?, limit: Int) throws -> [DirectoryEntry]
    /// Checks `access(2)` mode bits (R_OK=4, W_OK=2, X_OK=1; 0 checks existence).
    func access(_ context: RequestContext, ino: InodeID, mask: UInt32) throws
    /// Checks permission for open flags and registers the open with the session, so that an
    /// unlinked file stays readable until `release`. `O_TRUNC` truncates atomically.
    func open(_ context: RequestContext, ino: InodeID, flags: Int32) throws -> Attributes
    /// `open` (flags without `O_TRUNC`: EINVAL) and the slice lists of chunks
    /// `[0, chunkCount)` (at most `Limits.openLayoutChunksMax`, EINVAL beyond; none for a file
    /// that is not regular) as `layout` answers them, with the attributes read with the lists,
    /// in one call under one lease (SPEC.md §4 opcode 53): a file's first read needs no
    /// `layout` call. With `dataMaxBytes` > 0, a file that is one whole object this hub holds,
    /// of at most `dataMaxBytes` (capped at `Limits.openLayoutDataMaxBytes`), comes with that
    /// object's bytes, read and checked: its first read needs no call at all. An
    /// implementation without it opens and returns no lists and no bytes.
    func openLayout(_ context: RequestContext, ino: InodeID, flags: Int32, chunkCount: UInt32,
                    dataMaxBytes: UInt32) throws -> OpenedLayout
    func release(_ context: RequestContext, ino: InodeID) throws
    /// `release` of each of `inos` (an inode named twice is released twice), in one call; an
    /// inode this session has not open is skipped. At most `Limits.releaseManyMax` (EINVAL
    /// beyond). Agents send their closes this way, batched (SPEC.md §4 opcode 48).
    func releaseMany(_ context: RequestContext, inos: [InodeID]) throws
    /// The stored blocks `[firstBlock, firstBlock + count)` of object `id` (fewer at the object's
    /// end), unread and unverified, with the file span that holds them, for a server that sends
    /// them from the file (SPEC.md §4, Stored-block reads; the reader checks them). EINVAL for
    /// `count` 0 or over `StoredBlocks.countMax`, or `firstBlock` past the last block; ENOENT,
    /// EIO as `readSlice`. ENOSYS where the hub cannot (the default).
    func storedBlocks(_ context: RequestContext, id: SliceID, firstBlock: Int, count: Int) throws -> StoredBlocks
    /// `create(exclusive: true)` of a regular file, then `open` with `flags` for its creator
    /// whatever its mode, then with `writeLease` the write lease on it, in one call (one round
    /// trip to a remote home, SPEC.md §4 opcode 45). Also returns the parent directory's
    /// attributes after the change (read inside it, never by a read that waits for other
    /// changes: the caller's kernel holds the directory locked meanwhile), so the creator need
    /// not fetch them. EEXIST if the name exists.
    func createOpen(_ context: RequestContext, parent: InodeID, name: [UInt8], mode: UInt32, umask: UInt32,
                    flags: Int32, writeLease: Bool) throws -> CreatedFile

    // Extended attributes
    func getxattr(_ context: RequestContext, ino: InodeID, name: [UInt8]) throws -> [UInt8]
    func setxattr(_ context: RequestContext, ino: InodeID, name: [UInt8], value: [UInt8], flags: XattrFlags) throws
    func listxattr(_ context: RequestContext, ino: InodeID) throws -> [[UInt8]]
    func removexattr(_ context: RequestContext, ino: InodeID, name: [UInt8]) throws

    func statfs(_ context: RequestContext) throws -> FileSystemStats

    // Data
    /// Reserves `count` fresh, never reused slice ids; returns the first.
    func allocateSliceIDs(_ context: RequestContext, count: UInt32) throws -> SliceID
    /// Stores an immutable chunk object. Not visible in any file until `commitSlices`.
    func writeSlice(_ context: RequestContext, id: SliceID, data: [UInt8]) throws
    /// Same as `writeSlice(_:id:data:)` from caller memory (the in-process hub writes it with no copy).
    func writeSlice(_ context: RequestContext, id: SliceID, bytes: UnsafeRawBufferPointer) throws
    /// `writeSlice` of the object whose compressed stored image (the bytes of its whole file,
    /// SPEC.md §3.2) is `image`: checked as a read would check it, then stored as it is.
    /// EBADMSG for an image that fails a check (nothing stored), EINVAL on a volume that does
    /// not compress, ENOSYS where not served (SPEC.md §4, Compressed uploads).
    func writeObject(_ context: RequestContext, id: SliceID, image: UnsafeRawBufferPointer) throws
    /// `writeSlice` of the object a co-located agent wrote into the hub's own store under the
    /// temporary name of `tag`: checked (header, length, reserve), named and taken over as if the
    /// hub had stored it. ENOSYS where not served (SPEC.md §4, Co-located writes).
    func adoptObject(_ context: RequestContext, id: SliceID, tag: UInt32) throws
    /// Reads `length` bytes at `offset` of chunk object `id`, checksum-verified. A damaged
    /// chunk throws EIO, never wrong bytes.
    func readSlice(_ context: RequestContext, id: SliceID, offset: UInt32, length: UInt32) throws -> [UInt8]
    /// Same as `readSlice(_:id:offset:length:)`, reading `destination.count` bytes straight into
    /// caller memory (the in-process hub reads from disk into it with no copy).
    func readSlice(_ context: RequestContext, id: SliceID, offset: UInt32,
                   into destination: UnsafeMutableRawBufferPointer) throws
    /// The slice lists of chunks `firstChunk ..< firstChunk+count` of file `ino`, and its attributes.
    func layout(_ context: RequestContext, ino: InodeID, firstChunk: UInt32, count: UInt32) throws -> (Attributes, [[Slice]])
    /// Appends slices to the file's chunk lists and raises its size to at least `minimumSize`,
    /// in one atomic change. With `durable`, the change (and every earlier one) is on stable
    /// storage when this returns.
    func commitSlices(_ context: RequestContext, ino: InodeID, slices: [SliceCommit], minimumSize: UInt64,
                      durable: Bool) throws -> Attributes
    /// Makes every change acknowledged so far durable. EIO (the session's report, once) if a
    /// chunk sync failed on data this session's commits named, any file's (SPEC.md §3.2).
    func sync(_ context: RequestContext) throws
    /// `sync`, whose EIO is file `ino`'s report instead: once if a chunk sync failed on data that
    /// commits of the file named, in this session or in one that has ended, since the file was
    /// last told (by this call or a durable commit); other files' reports, and the session's,
    /// stay. The agent's `fsync` of a file with no buffered writes (SPEC.md §3.2, §4 opcode 52).
    /// A hub that keeps no per-file reports answers as `sync` (the default).
    func syncFile(_ context: RequestContext, ino: InodeID) throws
    /// Returns once no commit of `ino` by this agent that this hub received before the call
    /// can still run: one that timed out has then finished at the hub, applied or not
    /// (SPEC.md §4, Barriers). A hub in the same process runs calls synchronously: nothing to
    /// wait for.
    func barrier(_ context: RequestContext, ino: InodeID) throws

    // Locks (SPEC.md §12.6): held at the volume's home for the session, released when it ends.
    /// Sets, clears or tests a POSIX or flock lock on `ino`. A set that conflicts throws EAGAIN
    /// (the agent retries for F_SETLKW); a test returns the conflicting lock or `.none`.
    func lock(_ context: RequestContext, ino: InodeID, _ request: LockRequest) throws -> LockDescription

    // Administration
    func status() throws -> HubStatus
    func fsck(repair: Bool) throws -> FsckReport

    // Cluster (SPEC.md §12). A hub that is not part of a cluster answers with the defaults below.
    /// Opens a session on volume `volume` ("" means the hub's only volume). EREMOTE names the
    /// home hub when the volume's metadata lives elsewhere; ENOENT if there is no such volume.
    func openSession(agentName: String, volume: String) throws -> (SessionID, VolumeInfo)
    /// The cluster map as the hub knows it, JSON (`WeftCluster.ClusterMap`).
    func clusterMap() throws -> [UInt8]
    /// Records a new volume homed at hub `home`; returns its record, JSON (`WeftCluster.VolumeRecord`).
    func createVolume(name: String, home: String, chunkSizeBytes: UInt32, compression: Compression) throws -> [UInt8]

    // Leases (SPEC.md §12.6). A hub without leases answers with the defaults below, and its
    // agents then cache nothing across calls beyond what §6 allows.
    /// From now on, `session` holds read leases on what it reads, and `client` receives recalls.
    func enableLeases(_ session: SessionID, client: LeaseClient) throws
    /// Asks for the exclusive write lease on file `ino` (recalling other sessions' leases on it
    /// first). False when another session wrote it under a lease: both then write through.
    func acquireWriteLease(_ context: RequestContext, ino: InodeID) throws -> Bool
    /// After a reconnect: takes back the write lease on `ino` that the session's agent held
    /// (with writes still buffered) when its connection ended. Granted when no other session
    /// holds a lease on the file; served even during the grace period after a hub restart.
    func reclaimWriteLease(_ context: RequestContext, ino: InodeID) throws -> Bool

    // Data across hubs (SPEC.md §12.5).
    /// Opens a data-only session on `volume` at this hub, which is not its home: the session takes
    /// `writeSlice`, `readSlice`, `sync` and `releaseUploads`, stored in this hub's chunk store.
    func openDataSession(agentName: String, volume: String) throws -> (SessionID, VolumeInfo)
    /// `readSlice`, where `holders` names the hubs (ids, 0 = the volume's home) whose chunk
    /// stores hold object `id`. A hub that lacks the object fetches it once from a holder,
    /// verifies it and keeps a copy; it never returns wrong bytes (EIO if no good copy is found).
    func readSlice(_ context: RequestContext, id: SliceID, offset: UInt32, length: UInt32,
                   holders: [UInt16]) throws -> [UInt8]
    /// Same as `readSlice(_:id:offset:length:holders:)` into caller memory.
    func readSlice(_ context: RequestContext, id: SliceID, offset: UInt32, holders: [UInt16],
                   into destination: UnsafeMutableRawBufferPointer) throws
    /// Hub to hub: bytes `[offset, offset+length)` (clamped to the file) of the stored file of
    /// object `id`, unverified, and the file's length. ENOENT if this hub has no copy.
    func fetchObject(id: SliceID, offset: UInt32, length: UInt32) throws -> (fileBytes: UInt32, bytes: [UInt8])
    /// Objects `ids`, uploaded through this session, are committed at the home: they are no
    /// longer deleted when the session ends.
    func releaseUploads(_ context: RequestContext, ids: [SliceID]) throws
    /// Objects `ids` were uploaded through this session for a commit that failed (it was not
    /// applied): the hub deletes those of them the session wrote and has not committed, and
    /// ignores every other id, so that nothing a file references can go (SPEC.md §9.1).
    /// At most `Limits.discardUploadsMax` ids (EINVAL beyond). ENOSYS from a hub without it.
    func discardUploads(_ context: RequestContext, ids: [SliceID]) throws
    /// Home to holder hub: objects `ids` are garbage at their volume's home (no file references
    /// them, durably); this hub deletes every copy it has. Objects it lacks are skipped.
    func deleteObjects(ids: [SliceID]) throws
}

/// The result of `HubAPI.createOpen`.
public struct CreatedFile: Equatable, Sendable {
    /// The new file's attributes, as `open` returns them.
    public var attributes: Attributes
    /// The parent directory's attributes after the entry was added; nil where the hub cannot
    /// tell them in the same call.
    public var parent: Attributes?
    /// Whether the write lease on the new file was granted.
    public var writeLeased: Bool

    public init(attributes: Attributes, parent: Attributes?, writeLeased: Bool) {
        self.attributes = attributes
        self.parent = parent
        self.writeLeased = writeLeased
    }
}

/// What `openLayout` answers (SPEC.md §4 opcode 53).
public struct OpenedLayout: Sendable, Equatable {
    /// The file's attributes, read with `chunks`.
    public var attributes: Attributes
    /// The slice lists of chunks `[0, chunks.count)`.
    public var chunks: [[Slice]]
    /// The raw bytes of the file's only object, when the file is that object whole
    /// (`OpenedLayout.wholeObject`) and small enough; else empty.
    public var data: [UInt8]

    public init(attributes: Attributes, chunks: [[Slice]], data: [UInt8]) {
        self.attributes = attributes
        self.chunks = chunks
        self.data = data
    }

    /// The object a file of `size` bytes with these chunk lists is, whole: one slice at the
    /// start of chunk 0 covering all of an object of `size` bytes, and nothing else. Nil
    /// otherwise (several slices, part of an object, data past chunk 0, an empty file).
    public static func wholeObject(size: UInt64, chunks: [[Slice]]) -> Slice? {
        guard size > 0, let first = chunks.first, first.count == 1, let slice = first.first,
              chunks.dropFirst().allSatisfy(\.isEmpty), slice.offsetInChunk == 0, slice.sliceOffset == 0,
              UInt64(slice.length) == size, slice.objectLength == slice.length else { return nil }
        return slice
    }
}

extension HubAPI {
    public func barrier(_ context: RequestContext, ino: InodeID) throws {}

    public func syncFile(_ context: RequestContext, ino: InodeID) throws {
        try sync(context)
    }

    public func openLayout(_ context: RequestContext, ino: InodeID, flags: Int32, chunkCount: UInt32,
                           dataMaxBytes: UInt32) throws -> OpenedLayout {
        guard flags & O_TRUNC == 0 else { throw WeftError(EINVAL, "openLayout does not truncate") }
        try Limits.checkListCount(Int(chunkCount), max: Limits.openLayoutChunksMax, "openLayout", "chunks")
        return OpenedLayout(attributes: try open(context, ino: ino, flags: flags), chunks: [], data: [])
    }

    public func createOpen(_ context: RequestContext, parent: InodeID, name: [UInt8], mode: UInt32, umask: UInt32,
                           flags: Int32, writeLease: Bool) throws -> CreatedFile {
        try createOpenBySteps(context, parent: parent, name: name, mode: mode, umask: umask, flags: flags,
                              writeLease: writeLease)
    }

    public func unlinkEntry(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws -> Attributes? {
        try unlinkEntryBySteps(context, parent: parent, name: name)
    }

    /// `unlinkEntry` as the call it stands for: without the parent's attributes. (A `getattr`
    /// here would wait for any other change of the directory under way, whose recall of this
    /// caller may be waiting for the directory lock the caller's kernel holds.)
    public func unlinkEntryBySteps(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws -> Attributes? {
        try unlink(context, parent: parent, name: name)
        return nil
    }

    /// `createOpen` as the separate calls it stands for (a hub in the same process, or a remote
    /// hub that does not know opcode 45).
    public func createOpenBySteps(_ context: RequestContext, parent: InodeID, name: [UInt8], mode: UInt32, umask: UInt32,
                                  flags: Int32, writeLease: Bool) throws -> CreatedFile {
        let created = try create(context, parent: parent, name: name, mode: mode, rdev: 0, umask: umask, exclusive: true)
        let creator = RequestContext(session: context.session, credentials: .root)
        let attributes = try open(creator, ino: created.ino, flags: flags & ~O_TRUNC)
        let leased = writeLease ? try acquireWriteLease(creator, ino: created.ino) : false
        return CreatedFile(attributes: attributes, parent: nil, writeLeased: leased)   // see unlinkEntryBySteps
    }

    public func enableLeases(_ session: SessionID, client: LeaseClient) throws {
        throw WeftError(ENOTSUP, "this hub grants no leases")
    }

    public func acquireWriteLease(_ context: RequestContext, ino: InodeID) throws -> Bool { false }

    public func reclaimWriteLease(_ context: RequestContext, ino: InodeID) throws -> Bool { false }

    public func openSession(agentName: String, volume: String) throws -> (SessionID, VolumeInfo) {
        guard volume.isEmpty else {
            throw WeftError(ENOENT, "this hub serves a single volume and is not part of a cluster: mount it without a volume name")
        }
        return try openSession(agentName: agentName)
    }

    public func clusterMap() throws -> [UInt8] {
        throw WeftError(ENOTSUP, "this hub is not part of a cluster (weftd was started without --etcd)")
    }

    public func createVolume(name: String, home: String, chunkSizeBytes: UInt32, compression: Compression) throws -> [UInt8] {
        throw WeftError(ENOTSUP, "this hub is not part of a cluster (weftd was started without --etcd)")
    }

    public func openDataSession(agentName: String, volume: String) throws -> (SessionID, VolumeInfo) {
        throw WeftError(ENOTSUP, "this hub is not part of a cluster (weftd was started without --etcd)")
    }

    /// A hub with one chunk store holds every object of its volume: `holders` changes nothing.
    public func readSlice(_ context: RequestContext, id: SliceID, offset: UInt32, length: UInt32,
                          holders: [UInt16]) throws -> [UInt8] {
        try readSlice(context, id: id, offset: offset, length: length)
    }

    public func readSlice(_ context: RequestContext, id: SliceID, offset: UInt32, holders: [UInt16],
                          into destination: UnsafeMutableRawBufferPointer) throws {
        try readSlice(context, id: id, offset: offset, into: destination)
    }

    public func fetchObject(id: SliceID, offset: UInt32, length: UInt32) throws -> (fileBytes: UInt32, bytes: [UInt8]) {
        throw WeftError(ENOTSUP, "this hub is not part of a cluster (weftd was started without --etcd)")
    }

    public func releaseUploads(_ context: RequestContext, ids: [SliceID]) throws {}

    public func storedBlocks(_ context: RequestContext, id: SliceID, firstBlock: Int, count: Int) throws -> StoredBlocks {
        throw WeftError(ENOSYS, "this hub does not serve stored blocks")
    }

    public func releaseMany(_ context: RequestContext, inos: [InodeID]) throws {
        try Limits.checkListCount(inos.count, max: Limits.releaseManyMax, "releaseMany", "inodes")
        for ino in inos { try release(context, ino: ino) }
    }

    public func discardUploads(_ context: RequestContext, ids: [SliceID]) throws {
        throw WeftError(ENOSYS, "this hub does not discard uploads (they go when the session ends)")
    }

    public func adoptObject(_ context: RequestContext, id: SliceID, tag: UInt32) throws {
        throw WeftError(ENOSYS, "this hub does not take over objects written into its store")
    }

    public func deleteObjects(ids: [SliceID]) throws {
        throw WeftError(ENOTSUP, "this hub is not part of a cluster (weftd was started without --etcd)")
    }

    public func writeSlice(_ context: RequestContext, id: SliceID, bytes: UnsafeRawBufferPointer) throws {
        try writeSlice(context, id: id, data: Array(bytes))
    }

    public func readSlice(_ context: RequestContext, id: SliceID, offset: UInt32,
                          into destination: UnsafeMutableRawBufferPointer) throws {
        let bytes = try readSlice(context, id: id, offset: offset, length: UInt32(destination.count))
        guard bytes.count == destination.count else { throw WeftError(EIO, "short read of chunk object \(id)") }
        bytes.withUnsafeBytes { destination.copyMemory(from: $0) }
    }
}
