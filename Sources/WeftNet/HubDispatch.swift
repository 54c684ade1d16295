#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import WeftProto

extension HubRequest {
    /// Runs this request against `hub`, blocking the calling thread for as long as the hub does.
    /// A non-`WeftError` failure becomes EIO.
    func perform(on hub: HubAPI) -> Result<HubResponse, WeftError> {
        do {
            return .success(try performThrowing(on: hub))
        } catch let error as WeftError {
            return .failure(error)
        } catch {
            return .failure(WeftError(EIO, "hub failed: \(error)"))
        }
    }

    private func performThrowing(on hub: HubAPI) throws -> HubResponse {
        switch self {
        case let .openSession(agentName):
            let (session, volume) = try hub.openSession(agentName: agentName)
            return .session(session, volume)
        case let .closeSession(session):
            try hub.closeSession(session)
            return .empty
        case let .lookup(c, parent, name):
            return .attributes(try hub.lookup(c, parent: parent, name: name))
        case let .getattr(c, ino):
            return .attributes(try hub.getattr(c, ino: ino))
        case let .setattr(c, ino, changes):
            return .attributes(try hub.setattr(c, ino: ino, changes))
        case let .create(c, parent, name, mode, rdev, umask, exclusive):
            return .attributes(try hub.create(c, parent: parent, name: name, mode: mode, rdev: rdev, umask: umask,
                                              exclusive: exclusive))
        case let .createOpen(c, parent, name, mode, umask, flags, writeLease):
            return .created(try hub.createOpen(c, parent: parent, name: name, mode: mode, umask: umask, flags: flags,
                                               writeLease: writeLease))
        case let .mkdir(c, parent, name, mode, umask):
            return .attributes(try hub.mkdir(c, parent: parent, name: name, mode: mode, umask: umask))
        case let .unlink(c, parent, name):
            try hub.unlink(c, parent: parent, name: name)
            return .empty
        case let .unlinkEntry(c, parent, name):
            return .unlinked(try hub.unlinkEntry(c, parent: parent, name: name))
        case let .rmdir(c, parent, name):
            try hub.rmdir(c, parent: parent, name: name)
            return .empty
        case let .symlink(c, parent, name, target):
            return .attributes(try hub.symlink(c, parent: parent, name: name, target: target))
        case let .readlink(c, ino):
            return .bytes(try hub.readlink(c, ino: ino))
        case let .link(c, ino, newParent, newName):
            return .attributes(try hub.link(c, ino: ino, newParent: newParent, newName: newName))
        case let .rename(c, parent, name, newParent, newName, flags):
            try hub.rename(c, parent: parent, name: name, newParent: newParent, newName: newName, flags: flags)
            return .empty
        case let .readdir(c, ino, after, limit):
            return .entries(try hub.readdir(c, ino: ino, after: after, limit: Int(limit)))
        case let .access(c, ino, mask):
            try hub.access(c, ino: ino, mask: mask)
            return .empty
        case let .open(c, ino, flags):
            return .attributes(try hub.open(c, ino: ino, flags: flags))
        case let .release(c, ino):
            try hub.release(c, ino: ino)
            return .empty
        case let .getxattr(c, ino, name):
            return .bytes(try hub.getxattr(c, ino: ino, name: name))
        case let .setxattr(c, ino, name, value, flags):
            try hub.setxattr(c, ino: ino, name: name, value: value, flags: flags)
            return .empty
        case let .listxattr(c, ino):
            return .names(try hub.listxattr(c, ino: ino))
        case let .removexattr(c, ino, name):
            try hub.removexattr(c, ino: ino, name: name)
            return .empty
        case let .statfs(c):
            return .fileSystemStats(try hub.statfs(c))
        case let .allocateSliceIDs(c, count):
            return .firstSliceID(try hub.allocateSliceIDs(c, count: count))
        case let .writeSlice(c, id, data):
            try hub.writeSlice(c, id: id, data: data)
            return .empty
        case let .writeObject(c, id, image):
            try image.withUnsafeBytes { try hub.writeObject(c, id: id, image: $0) }
            return .empty
        case let .readSlice(c, id, offset, length):
            return .bytes(try hub.readSlice(c, id: id, offset: offset, length: length))
        case let .layout(c, ino, firstChunk, count):
            let (attributes, chunks) = try hub.layout(c, ino: ino, firstChunk: firstChunk, count: count)
            return .layout(attributes, chunks)
        case let .commitSlices(c, ino, slices, minimumSize, durable):
            return .attributes(try hub.commitSlices(c, ino: ino, slices: slices, minimumSize: minimumSize, durable: durable))
        case let .sync(c):
            try hub.sync(c)
            return .empty
        case let .barrier(c, ino):
            try hub.barrier(c, ino: ino)
            return .empty
        case let .syncFile(c, ino):
            try hub.syncFile(c, ino: ino)
            return .empty
        case let .adoptObject(c, id, tag):
            try hub.adoptObject(c, id: id, tag: tag)
            return .empty
        case let .openLayout(c, ino, flags, chunkCount, dataMaxBytes):
            return .openedLayout(try hub.openLayout(c, ino: ino, flags: flags, chunkCount: chunkCount, dataMaxBytes: dataMaxBytes))
        case .status:
            return .status(try hub.status())
        case let .fsck(repair):
            return .fsckReport(try hub.fsck(repair: repair).limitedForWire())
        case let .fsckRemaining(repair):
            return .fsckResult(try hub.fsck(repair: repair).limitedForWire())
        case let .openVolumeSession(agentName, volume):
            let (session, info) = try hub.openSession(agentName: agentName, volume: volume)
            return .session(session, info)
        case .clusterMap:
            return .bytes(try hub.clusterMap())
        case .localReads:
            // Needs the connection's peer and the server's offer: the server answers it
            // (ServerCore.execute); a hub called in process has nothing to offer.
            throw WeftError(ENOSYS, "localReads is only served over a connection")
        case let .lock(c, ino, request):
            return .lock(try hub.lock(c, ino: ino, request))
        case .ping:
            return .empty
        case .fence:
            // Fences connections: the server handles it (ServerCore.execute).
            throw WeftError(EINVAL, "fence is only served over a connection")
        case .enableLeases:
            // Needs the connection to call back on: the server handles it (ServerCore.execute).
            throw WeftError(EINVAL, "enableLeases is only served over a connection")
        case .recall:
            throw WeftError(EINVAL, "recall is sent by hubs, not to them")
        case let .acquireWriteLease(c, ino):
            return .flag(try hub.acquireWriteLease(c, ino: ino))
        case let .reclaimWriteLease(c, ino):
            return .flag(try hub.reclaimWriteLease(c, ino: ino))
        case let .openDataSession(agentName, volume):
            let (session, info) = try hub.openDataSession(agentName: agentName, volume: volume)
            return .session(session, info)
        case let .readSliceFrom(c, id, offset, length, holders):
            return .bytes(try hub.readSlice(c, id: id, offset: offset, length: length, holders: holders))
        case let .fetchObject(id, offset, length):
            let (fileBytes, bytes) = try hub.fetchObject(id: id, offset: offset, length: length)
            return .objectPart(fileBytes: fileBytes, bytes)
        case let .releaseUploads(c, ids):
            try hub.releaseUploads(c, ids: ids)
            return .empty
        case let .discardUploads(c, ids):
            try hub.discardUploads(c, ids: ids)
            return .empty
        case let .releaseMany(c, inos):
            try hub.releaseMany(c, inos: inos)
            return .empty
        case .readBlocks:
            // Answered from the file by the server (ServerCore.executeBulk), never as a value.
            throw WeftError(ENOSYS, "readBlocks is served by the server's bulk path only")
        case let .deleteObjects(ids):
            try hub.deleteObjects(ids: ids)
            return .empty
        case let .createVolume(name, home, chunkSizeBytes, compression):
            return .bytes(try hub.createVolume(name: name, home: home, chunkSizeBytes: chunkSizeBytes, compression: compression))
        }
    }
}
