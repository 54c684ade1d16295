import Foundation
import Logging
import WeftCluster
import WeftNet
import WeftProto
import WeftVFS

/// The agent side of a global-root mount (`weft://HOST:PORT/`): the hub it mounts through
/// (its region), and a `GlobalNamespace` whose volumes each talk to their home over that
/// region's route, sharing one block cache and one write bound.
final class GlobalRoot {
    let entry: RemoteHub
    let namespace: GlobalNamespace
    private let lock = NSLock()
    private var volumeHubs: [RemoteHub] = []

    private init(entry: RemoteHub, namespace: GlobalNamespace) {
        self.entry = entry
        self.namespace = namespace
    }

    static func open(address: HubAddress, options: VFSOptions, requestTimeoutMs: Int, compressUploads: Bool = true,
                     logger: Logger) throws -> GlobalRoot {
        let entry = RemoteHub(address: address, connectTimeoutMs: HubOpener.connectTimeoutMs,
                              requestTimeoutMs: requestTimeoutMs, logger: logger)
        // Fail at mount time, with the hub's own message, if this is no cluster hub.
        do {
            _ = try volumes(of: entry)
        } catch {
            entry.close()
            throw error
        }
        let shared = VFSShared(options: options)
        var root: GlobalRoot?
        let namespace = GlobalNamespace(
            listVolumes: { try volumes(of: entry) },
            openVolume: { volume in
                let (hub, connections) = try HubOpener.openVolumeAPI(address: address, volume: volume.name,
                                                                     requestTimeoutMs: requestTimeoutMs,
                                                                     compressUploads: compressUploads, logger: logger)
                var volumeOptions = options
                volumeOptions.volume = volume.name
                do {
                    let vfs = try VFS(hub: hub, options: volumeOptions, logger: logger, shared: shared,
                                      kernelInoBase: UInt64(volume.id) << 48)
                    root?.lock.withLock { root?.volumeHubs.append(contentsOf: connections) }
                    return vfs
                } catch {
                    for connection in connections { connection.close() }
                    throw error
                }
            },
            leaseCache: shared.leaseCache,
            logger: logger)
        root = GlobalRoot(entry: entry, namespace: namespace)
        return root!
    }

    /// The cluster's volumes, from the map of the hub this agent mounts through.
    static func volumes(of hub: RemoteHub) throws -> [GlobalNamespace.Volume] {
        let map = try ClusterMap.decode(try hub.clusterMap(), from: hub.address.displayName)
        return map.volumes.values.filter { $0.id != 0 }.map { GlobalNamespace.Volume(name: $0.name, id: $0.id) }
    }

    func close(logger: Logger) {
        let hubs = lock.withLock { volumeHubs }
        HubOpener.logCompressedUploads(hubs, logger: logger)
        for hub in hubs { hub.close() }
    }
}
