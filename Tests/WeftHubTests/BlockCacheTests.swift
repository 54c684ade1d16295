import Foundation
import XCTest
import WeftProto
@testable import WeftVFS

/// The block cache's batch calls (SPEC.md §7, Block cache): one lock per stretch of blocks, with
/// the same single-flight rules as the per-block calls.
final class BlockCacheTests: XCTestCase {
    private let blockBytes = Limits.blockSizeBytes

    private func key(_ block: Int, object: SliceID = 9) -> BlockCache.Key {
        BlockCache.Key(object: object, block: UInt32(block))
    }

    private func block(_ slab: Slab, _ index: Int) -> CachedBlock {
        CachedBlock(slab: slab, offset: index * blockBytes, length: blockBytes)
    }

    private func states(_ found: [BlockCache.Lookup]) -> [String] {
        found.map {
            switch $0 {
            case .cached: "cached"
            case .claimed: "claimed"
            case .busy: "busy"
            }
        }
    }

    func testLookupReturnsCachedBlocksClaimsFreeOnesAndReportsBusyOnes() throws {
        let cache = BlockCache(capacityBytes: 64 * blockBytes, slabs: SlabPool(budgetBytes: 1 << 20))
        let slab = Slab(capacity: 8 * blockBytes, pool: cache.slabs)
        cache.fill([(key(0), block(slab, 0)), (key(1), block(slab, 1))])
        XCTAssertTrue(cache.tryClaim(key(3)), "another reader fetches block 3")

        let found = cache.lookup(object: 9, blocks: 0...4)
        XCTAssertEqual(states(found), ["cached", "cached", "claimed", "busy", "claimed"])
        if case .cached(let first) = found[0] { XCTAssertEqual(first.pointer, slab.pointer) } else { XCTFail() }
        XCTAssertEqual(cache.tryClaim(object: 9, blocks: 0...5), [false, false, false, false, false, true],
                       "cached and claimed blocks cannot be claimed again; block 5 was free")
        XCTAssertEqual(states(cache.lookup(object: 10, blocks: 0...1)), ["claimed", "claimed"],
                       "another object's blocks are separate")

        cache.fill([(key(2), block(slab, 2))])
        cache.abandon([key(3), key(4), key(5)])
        XCTAssertNotNil(cache.get(key(2)))
        XCTAssertNil(cache.get(key(4)), "an abandoned claim leaves nothing cached")
        XCTAssertEqual(cache.tryClaim(object: 9, blocks: 2...5), [false, true, true, true])
        XCTAssertEqual(cache.usedBytes, 3 * blockBytes)
    }

    func testTryClaimRunStopsAtTheFirstCachedOrFetchedBlock() {
        let cache = BlockCache(capacityBytes: 64 * blockBytes, slabs: SlabPool(budgetBytes: 1 << 20))
        let slab = Slab(capacity: blockBytes, pool: cache.slabs)
        cache.fill(key(5), block(slab, 0))
        XCTAssertTrue(cache.tryClaim(key(8)))
        XCTAssertEqual(cache.tryClaimRun(object: 9, from: 2, through: 10), 3, "blocks 2-4, up to the cached 5")
        XCTAssertEqual(cache.tryClaimRun(object: 9, from: 5, through: 10), 0)
        XCTAssertEqual(cache.tryClaimRun(object: 9, from: 6, through: 10), 2, "blocks 6-7, up to the claimed 8")
        XCTAssertEqual(cache.tryClaimRun(object: 9, from: 9, through: 10), 2)
        XCTAssertEqual(cache.tryClaimRun(object: 9, from: 11, through: 10), 0, "an empty stretch")
        XCTAssertEqual(states(cache.lookup(object: 9, blocks: 2...4)), ["busy", "busy", "busy"])
    }

    func testOneBatchFillWakesAWaiterAndKeepsTheBound() throws {
        let cache = BlockCache(capacityBytes: 4 * blockBytes, slabs: SlabPool(budgetBytes: 1 << 20))
        XCTAssertEqual(states(cache.lookup(object: 9, blocks: 0...5)), Array(repeating: "claimed", count: 6))
        let waited = expectation(description: "a reader waiting for block 3 gets it")
        Thread.detachNewThread {
            let (cached, claimed) = cache.claim(self.key(3))
            XCTAssertNotNil(cached)
            XCTAssertFalse(claimed)
            waited.fulfill()
        }
        Thread.sleep(forTimeInterval: 0.05)   // let it wait (it also passes if it comes later)
        let slab = Slab(capacity: 6 * blockBytes, pool: cache.slabs)
        cache.fill((0..<6).map { (key($0), block(slab, $0)) })
        wait(for: [waited], timeout: 10)
        XCTAssertEqual(cache.usedBytes, 4 * blockBytes, "filled past the bound, then the oldest went")
        XCTAssertNil(cache.get(key(0)))
        XCTAssertNil(cache.get(key(1)))
        XCTAssertNotNil(cache.get(key(5)))
        XCTAssertEqual(cache.tryClaim(object: 9, blocks: 0...1), [true, true], "evicted blocks are free again")
    }
}
