import Foundation
import WeftProto

/// The `HubAPI` of one volume for an agent whose own hub is not the volume's home (SPEC.md
/// §12.5): metadata calls go to the home; chunk writes, reads and their syncs go to the agent's
/// own hub (the "data hub") through a data-only session, so a volume's data crosses the WAN
/// once per hub, not once per agent.
///
/// Guarantees: every slice this agent commits records `hub` = the data hub's id, and is
/// durable at the data hub before the commit is sent to the home; a session opened here opens
/// one session at each hub and closes both.
public final class SplitVolumeHub: HubAPI, @unchecked Sendable {
    public let home: HubAPI
    public let data: HubAPI
    /// The data hub's id in the cluster, recorded in committed slices.
    public let dataHubID: UInt16
    private let lock = NSLock()
    /// Home session → data session.
    private var dataSessions: [SessionID: SessionID] = [:]

    public init(home: HubAPI, data: HubAPI, dataHubID: UInt16) {
        precondition(dataHubID != 0, "a data hub has a cluster id")
        self.home = home
        self.data = data
        self.dataHubID = dataHubID
    }

    private func dataContext(_ context: RequestContext) throws -> RequestContext {
        guard let session = lock.withLock({ dataSessions[context.session] }) else {
            throw WeftError(EBADF, "session \(context.session) has no data session")
        }
        var inner = context
        inner.session = session
        return inner
    }

    // MARK: Sessions

    public func openSession(agentName: String) throws -> (SessionID, VolumeInfo) {
        throw WeftError(EINVAL, "a volume split across hubs needs a volume name")
    }

    public func openSession(agentName: String, volume: String) throws -> (SessionID, VolumeInfo) {
        let (session, info) = try home.openSession(agentName: agentName, volume: volume)
        do {
            let (dataSession, _) = try data.openDataSession(agentName: agentName, volume: volume)
            lock.withLock { dataSessions[session] = dataSession }
        } catch {
            try? home.closeSession(session)
            throw error
        }
        return (session, info)
    }

    public func closeSession(_ session: SessionID) throws {
        if let dataSession = lock.withLock({ dataSessions.removeValue(forKey: session) }) {
            try? data.closeSession(dataSession)
        }
        try home.closeSession(session)
    }

    // MARK: Data: the agent's own hub

    public func allocateSliceIDs(_ context: RequestContext, count: UInt32) throws -> SliceID {
        try home.allocateSliceIDs(context, count: count)
    }

    public func writeSlice(_ context: RequestContext, id: SliceID, data bytes: [UInt8]) throws {
        try data.writeSlice(try dataContext(context), id: id, data: bytes)
    }

    public func writeSlice(_ context: RequestContext, id: SliceID, bytes: UnsafeRawBufferPointer) throws {
        try data.writeSlice(try dataContext(context), id: id, bytes: bytes)
    }

    public func writeObject(_ context: RequestContext, id: SliceID, image: UnsafeRawBufferPointer) throws {
        try data.writeObject(try dataContext(context), id: id, image: image)
    }

    public func readSlice(_ context: RequestContext, id: SliceID, offset: UInt32, length: UInt32) throws -> [UInt8] {
        try data.readSlice(try dataContext(context), id: id, offset: offset, length: length)
    }

    public func readSlice(_ context: RequestContext, id: SliceID, offset: UInt32,
                          into destination: UnsafeMutableRawBufferPointer) throws {
        try data.readSlice(try dataContext(context), id: id, offset: offset, into: destination)
    }

    public func readSlice(_ context: RequestContext, id: SliceID, offset: UInt32, length: UInt32,
                          holders: [UInt16]) throws -> [UInt8] {
        try data.readSlice(try dataContext(context), id: id, offset: offset, length: length, holders: holders)
    }

    /// An object whose only holder is the data hub itself is read as one naming no holder, so
    /// that whole blocks go as stored blocks (SPEC.md §4): the hub looks in its own store first
    /// and, failing that, fetches from the home either way (it never fetches from itself).
    public func readSlice(_ context: RequestContext, id: SliceID, offset: UInt32, holders: [UInt16],
                          into destination: UnsafeMutableRawBufferPointer) throws {
        if holders == [dataHubID] {
            return try data.readSlice(try dataContext(context), id: id, offset: offset, into: destination)
        }
        try data.readSlice(try dataContext(context), id: id, offset: offset, holders: holders, into: destination)
    }

    /// Syncs the uploads at the data hub, commits at the home with `hub` = the data hub, then
    /// tells the data hub the objects are committed (so it keeps them when the session ends).
    public func commitSlices(_ context: RequestContext, ino: InodeID, slices: [SliceCommit], minimumSize: UInt64,
                             durable: Bool) throws -> Attributes {
        let dataContext = try dataContext(context)
        if !slices.isEmpty { try data.sync(dataContext) }
        let recorded = slices.map { commit -> SliceCommit in
            var commit = commit
            if commit.slice.id != 0 && commit.slice.hub == 0 { commit.slice.hub = dataHubID }
            return commit
        }
        let attributes = try home.commitSlices(context, ino: ino, slices: recorded, minimumSize: minimumSize,
                                               durable: durable)
        let ids = slices.map(\.slice.id).filter { $0 != 0 }
        if !ids.isEmpty { try? data.releaseUploads(dataContext, ids: ids) }
        return attributes
    }

    /// The objects were written at the data hub: they are discarded there.
    public func discardUploads(_ context: RequestContext, ids: [SliceID]) throws {
        try data.discardUploads(try dataContext(context), ids: ids)
    }

    public func sync(_ context: RequestContext) throws {
        try data.sync(try dataContext(context))
        try home.sync(context)
    }

    /// The data hub reports per session only (its ESTALE makes the agent write its staged
    /// uploads again); the home per file.
    public func syncFile(_ context: RequestContext, ino: InodeID) throws {
        try data.sync(try dataContext(context))
        try home.syncFile(context, ino: ino)
    }

    /// Commits go to the home; the data hub's uploads cannot reorder them.
    public func barrier(_ context: RequestContext, ino: InodeID) throws {
        try home.barrier(context, ino: ino)
    }

    // MARK: Metadata: the home

    public func lookup(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws -> Attributes {
        try home.lookup(context, parent: parent, name: name)
    }

    public func getattr(_ context: RequestContext, ino: InodeID) throws -> Attributes {
        try home.getattr(context, ino: ino)
    }

    public func setattr(_ context: RequestContext, ino: InodeID, _ changes: SetAttributes) throws -> Attributes {
        try home.setattr(context, ino: ino, changes)
    }

    public func create(_ context: RequestContext, parent: InodeID, name: [UInt8], mode: UInt32, rdev: UInt32,
                       umask: UInt32, exclusive: Bool) throws -> Attributes {
        try home.create(context, parent: parent, name: name, mode: mode, rdev: rdev, umask: umask, exclusive: exclusive)
    }

    public func unlinkEntry(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws -> Attributes? {
        try home.unlinkEntry(context, parent: parent, name: name)
    }

    public func createOpen(_ context: RequestContext, parent: InodeID, name: [UInt8], mode: UInt32, umask: UInt32,
                           flags: Int32, writeLease: Bool) throws -> CreatedFile {
        try home.createOpen(context, parent: parent, name: name, mode: mode, umask: umask, flags: flags,
                            writeLease: writeLease)
    }

    public func mkdir(_ context: RequestContext, parent: InodeID, name: [UInt8], mode: UInt32, umask: UInt32) throws -> Attributes {
        try home.mkdir(context, parent: parent, name: name, mode: mode, umask: umask)
    }

    public func unlink(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws {
        try home.unlink(context, parent: parent, name: name)
    }

    public func rmdir(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws {
        try home.rmdir(context, parent: parent, name: name)
    }

    public func symlink(_ context: RequestContext, parent: InodeID, name: [UInt8], target: [UInt8]) throws -> Attributes {
        try home.symlink(context, parent: parent, name: name, target: target)
    }

    public func readlink(_ context: RequestContext, ino: InodeID) throws -> [UInt8] {
        try home.readlink(context, ino: ino)
    }

    public func link(_ context: RequestContext, ino: InodeID, newParent: InodeID, newName: [UInt8]) throws -> Attributes {
        try home.link(context, ino: ino, newParent: newParent, newName: newName)
    }

    public func rename(_ context: RequestContext, parent: InodeID, name: [UInt8], newParent: InodeID, newName: [UInt8],
                       flags: RenameFlags) throws {
        try home.rename(context, parent: parent, name: name, newParent: newParent, newName: newName, flags: flags)
    }

    public func readdir(_ context: RequestContext, ino: InodeID, after: [UInt8]?, limit: Int) throws -> [DirectoryEntry] {
        try home.readdir(context, ino: ino, after: after, limit: limit)
    }

    public func access(_ context: RequestContext, ino: InodeID, mask: UInt32) throws {
        try home.access(context, ino: ino, mask: mask)
    }

    public func open(_ context: RequestContext, ino: InodeID, flags: Int32) throws -> Attributes {
        try home.open(context, ino: ino, flags: flags)
    }

    public func openLayout(_ context: RequestContext, ino: InodeID, flags: Int32, chunkCount: UInt32,
                           dataMaxBytes: UInt32) throws -> OpenedLayout {
        // No bytes from the home: reads go through this hub's cache, fetched across the WAN
        // once per hub (SPEC.md §12.5), not once per agent.
        try home.openLayout(context, ino: ino, flags: flags, chunkCount: chunkCount, dataMaxBytes: 0)
    }

    public func release(_ context: RequestContext, ino: InodeID) throws {
        try home.release(context, ino: ino)
    }

    public func releaseMany(_ context: RequestContext, inos: [InodeID]) throws {
        try home.releaseMany(context, inos: inos)
    }

    public func getxattr(_ context: RequestContext, ino: InodeID, name: [UInt8]) throws -> [UInt8] {
        try home.getxattr(context, ino: ino, name: name)
    }

    public func setxattr(_ context: RequestContext, ino: InodeID, name: [UInt8], value: [UInt8], flags: XattrFlags) throws {
        try home.setxattr(context, ino: ino, name: name, value: value, flags: flags)
    }

    public func listxattr(_ context: RequestContext, ino: InodeID) throws -> [[UInt8]] {
        try home.listxattr(context, ino: ino)
    }

    public func removexattr(_ context: RequestContext, ino: InodeID, name: [UInt8]) throws {
        try home.removexattr(context, ino: ino, name: name)
    }

    public func statfs(_ context: RequestContext) throws -> FileSystemStats {
        try home.statfs(context)
    }

    public func layout(_ context: RequestContext, ino: InodeID, firstChunk: UInt32, count: UInt32) throws -> (Attributes, [[Slice]]) {
        try home.layout(context, ino: ino, firstChunk: firstChunk, count: count)
    }

    public func lock(_ context: RequestContext, ino: InodeID, _ request: LockRequest) throws -> LockDescription {
        try home.lock(context, ino: ino, request)
    }

    // Leases are held at the home, which alone sees the changes that recall them (SPEC.md §12.6).
    public func enableLeases(_ session: SessionID, client: LeaseClient) throws {
        try home.enableLeases(session, client: client)
    }

    public func acquireWriteLease(_ context: RequestContext, ino: InodeID) throws -> Bool {
        try home.acquireWriteLease(context, ino: ino)
    }

    public func reclaimWriteLease(_ context: RequestContext, ino: InodeID) throws -> Bool {
        try home.reclaimWriteLease(context, ino: ino)
    }

    public func status() throws -> HubStatus { try home.status() }
    public func fsck(repair: Bool) throws -> FsckReport { try home.fsck(repair: repair) }
    public func clusterMap() throws -> [UInt8] { try home.clusterMap() }
}
